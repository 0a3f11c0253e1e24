"""Constrained decoding in the engine: every schema valid on both tiny models at temperature 0 and
1, every preset of both families, unconstrained neighbours untouched, the output closes within
max_tokens, and the frontier rule on hand-made canvases."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from dllm_serve.config import EngineConfig
from dllm_serve.engine import grammar
from dllm_serve.engine.algorithms import presets_for, resolve_params
from dllm_serve.engine.constrained import FrontierGuide, RowConstraint
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.loader import LoadedModel, load_model
from tests.nemotron_helpers import TINY_NEMOTRON
from tests.structured_schemas import SCHEMAS

NESTED = SCHEMAS["nested"]


@pytest.fixture(scope="module")
def nemotron() -> LoadedModel:
    return load_model(TINY_NEMOTRON)


def _vocab(engine: Engine) -> grammar.GrammarVocab:
    return grammar.vocab_for(engine.loaded.tokenizer, engine.runner.stop_ids)


def _request(engine, rid, schema, preset, max_tokens=64, **opts) -> GenerationRequest:
    compiled = grammar.json_schema(schema, _vocab(engine), max_tokens)
    assert compiled.min_tokens is not None and compiled.min_tokens <= max_tokens, rid
    prompt = engine.loaded.tokenizer.render_chat([{"role": "user", "content": "Answer in JSON."}])
    params = resolve_params(preset, engine.loaded.family, max_tokens, opts)
    return GenerationRequest(
        rid, prompt, params, max_tokens, constraint=RowConstraint(compiled.row(), compiled.closing)
    )


def _check(engine, results, schemas) -> None:
    for rid, res in results.items():
        text = engine.loaded.tokenizer.decode(res.token_ids)
        assert res.finish_reason == "stop", (rid, text)
        jsonschema.validate(json.loads(text), schemas[rid])


@pytest.mark.parametrize("model", ["tiny", "nemotron"])
def test_every_schema_is_valid_at_temperature_0_and_1(model, request):
    loaded = request.getfixturevalue(model)
    engine = Engine(loaded, EngineConfig(max_batch_size=128))
    preset = "nemotron" if model == "nemotron" else "dinfer_blockwise"
    reqs, schemas = [], {}
    for name, schema in SCHEMAS.items():
        for temp in (0.0, 1.0):
            rid = f"{name}@{temp}"
            schemas[rid] = schema
            reqs.append(_request(engine, rid, schema, preset, temperature=temp, seed=7))
    _check(engine, engine.run_to_completion(reqs), schemas)


@pytest.mark.parametrize("preset", [p.name for p in presets_for("llada")])
def test_every_llada_preset_honours_the_constraint(tiny, preset):
    engine = Engine(tiny, EngineConfig())
    reqs = [_request(engine, f"t{t}", NESTED, preset, temperature=t, seed=3) for t in (0.0, 1.0)]
    _check(engine, engine.run_to_completion(reqs), {r.request_id: NESTED for r in reqs})


@pytest.mark.parametrize(
    ("model", "preset"), [("tiny", "llada"), ("tiny", "dinfer_credit"), ("nemotron", "nemotron")]
)
def test_constraints_never_change_an_unconstrained_row(model, preset, request):
    """The same free request alone and batched with constrained rows: the same tokens."""
    loaded = request.getfixturevalue(model)
    prompt = loaded.tokenizer.render_chat([{"role": "user", "content": "say something"}])
    params = resolve_params(preset, loaded.family, 48, {"temperature": 1.0, "seed": 11})

    def free() -> GenerationRequest:
        return GenerationRequest("free", prompt, params, 48)

    engine = Engine(loaded, EngineConfig())
    alone = engine.run_to_completion([free()])["free"]
    engine = Engine(loaded, EngineConfig())
    mixed = [_request(engine, f"c{i}", NESTED, preset, temperature=1.0, seed=i) for i in range(3)]
    together = engine.run_to_completion([mixed[0], free(), *mixed[1:]])
    assert together["free"].token_ids == alone.token_ids
    assert together["free"].forwards == alone.forwards
    _check(engine, {k: v for k, v in together.items() if k != "free"}, {f"c{i}": NESTED for i in range(3)})


def test_output_closes_within_a_tight_max_tokens(tiny):
    """A schema with an unbounded string and a canvas barely longer than its shortest output: the
    row is steered to close, ends with a stop token, and validates."""
    engine = Engine(tiny, EngineConfig())
    schema = {
        "type": "object",
        "properties": {"text": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["text", "n"],
    }
    shortest = grammar.json_schema(schema, _vocab(engine), 64).min_tokens
    reqs = [
        _request(engine, f"s{s}", schema, "llada", max_tokens=shortest + 3, temperature=1.0, seed=s)
        for s in range(6)
    ]
    results = engine.run_to_completion(reqs)
    _check(engine, results, {r.request_id: schema for r in reqs})
    assert all(len(r.token_ids) < shortest + 3 for r in results.values())


def _row(engine, pattern: str) -> RowConstraint:
    compiled = grammar.regex(pattern, _vocab(engine), 32)
    row = RowConstraint(compiled.row(), compiled.closing)
    row.start(2)
    return row


def test_frontier_refuses_provisional_tokens_that_break_the_grammar(tiny):
    """Hand-made canvas (2 prompt tokens, then the output): committed tokens beyond the frontier
    are provisional; when the frontier reaches them the grammar accepts or masks them again."""
    engine = Engine(tiny, EngineConfig())
    tok = tiny.tokenizer
    mask = tiny.model.roles.mask_token_id
    a, b, c, x = (tok.encode(ch)[0] for ch in "abcx")
    row = _row(engine, "ab+c")
    canvas = torch.tensor([0, 0, mask, b, x, mask, mask, mask, mask, mask])
    row.advance(canvas, mask, block_end=10, out_end=10)
    # 'a' is the only allowed first token: forced; then b accepted; x refused and masked again.
    assert canvas.tolist()[2:5] == [a, b, mask] and row.frontier == 4
    canvas[4], canvas[5] = c, b  # a later step: c at the frontier, a provisional b after it
    row.advance(canvas, mask, block_end=10, out_end=10)
    # 'abc' is complete: only a stop token may follow, so b is masked again, then the stop is forced.
    assert canvas[5] == engine.runner.stop_ids[0] and row.done and row.frontier == 5


def test_frontier_closes_when_the_canvas_runs_out(tiny):
    """A token that leaves no room to finish is refused; the plan and a stop token are written."""
    engine = Engine(tiny, EngineConfig())
    tok = tiny.tokenizer
    mask = tiny.model.roles.mask_token_id
    row = _row(engine, "a+b")
    canvas = torch.tensor([0, 0] + [mask] * 4)
    canvas[2:5] = torch.tensor([tok.encode("a")[0]] * 3)  # a a a would leave no room for b + stop
    row.advance(canvas, mask, block_end=6, out_end=6)
    assert tok.decode(canvas[2:5].tolist()) == "aab" and canvas[5] == engine.runner.stop_ids[0] and row.done


def test_grammar_mask_and_forced_commit_read_nothing_back():
    """On meta tensors (no values: any read-back raises, see test_no_readback.py) the device side of
    the constraint, mask and forced commit, runs: it adds no synchronisation to a step."""
    meta = torch.device("meta")
    rows = torch.zeros(2, dtype=torch.long, device=meta)
    guide = FrontierGuide(
        rows, rows.clone(), torch.zeros(2, 12, dtype=torch.int32, device=meta), {0: 0, 2: 1}
    )
    logits = torch.zeros(3, 16, 384, device=meta)
    for i in (0, 2):
        hook = guide.hook(i)
        assert hook is not None and hook(logits[i], logits[i, :, 0], logits[i, :, 0] > 0).shape == (16, 384)
    assert guide.hook(1) is None
    commit = torch.zeros(3, 16, dtype=torch.bool, device=meta)
    assert guide.force(commit).shape == commit.shape
