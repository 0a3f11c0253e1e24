"""Output constraints on Nemotron-Labs-Diffusion's causal presets (engine/causal_modes.py) with the
bundled tiny-nemotron-labs, which never saw JSON: every valid output is the grammar's work.

- Each preset (diffusion, AR, self-speculative) gives valid output for a JSON schema, a regex and a
  choice at temperature 0 and 1, finishing with ``stop`` within ``max_tokens``, also when
  ``max_tokens`` barely fits the shortest valid output.
- Constrained self-speculation equals constrained AR at temperature 0, token for token (its verify
  step accepts only a prefix the grammar accepts, and the token after it is the grammar-masked
  causal choice), as unconstrained speculation equals AR.
- The diffusion preset opens each block with the grammar-masked causal choice (recomputed without
  a cache).
- A free row batched with constrained rows keeps its tokens and forwards; the masks read nothing
  back from the device.
"""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
import torch

from dllm_serve.config import EngineConfig
from dllm_serve.engine import grammar
from dllm_serve.engine.algorithms import resolve_params
from dllm_serve.engine.constrained import FrontierGuide, RowConstraint
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.loader import LoadedModel, load_model
from tests.nemotron_labs_helpers import TINY_LABS
from tests.structured_schemas import SCHEMAS

PRESETS = ("nemotron_labs", "nemotron_labs_ar", "nemotron_labs_spec")
REGEX = r"[0-9]{1,3} apples"
CHOICES = ["yes", "no", "maybe"]


@pytest.fixture(scope="module")
def labs() -> LoadedModel:
    return load_model(TINY_LABS)


def _engine(loaded: LoadedModel) -> Engine:
    return Engine(loaded, EngineConfig(max_batch_size=64))


def _run(engine: Engine, requests: list[GenerationRequest], iterations: int = 400) -> dict:
    """Run to completion, failing (not hanging) if a row has not finished after ``iterations``
    engine steps: a grammar that refused a causal prediction would make a greedy row retry it
    forever. Every row here needs at most about 2 x 96 + a few."""
    count = 0

    def step() -> bool:
        nonlocal count
        count += 1
        assert count <= iterations, "rows did not finish"
        return engine.step()

    return engine.run_to_completion(requests, step)


def _prompt(loaded: LoadedModel, text: str = "Answer in JSON.") -> list[int]:
    return loaded.tokenizer.render_chat([{"role": "user", "content": text}])


def _compile(engine: Engine, kind: str, max_tokens: int, schema: dict | None = None) -> grammar.Grammar:
    vocab = grammar.vocab_for(engine.loaded.tokenizer, engine.runner.stop_ids)
    if kind == "regex":
        return grammar.regex(REGEX, vocab, max_tokens)
    if kind == "choice":
        return grammar.choice(CHOICES, vocab, max_tokens)
    return grammar.json_schema(schema, vocab, max_tokens)


def _request(engine, rid, compiled, preset, max_tokens, **opts) -> GenerationRequest:
    loaded = engine.loaded
    assert compiled.min_tokens is not None and compiled.min_tokens <= max_tokens, rid
    params = resolve_params(preset, loaded.family, max_tokens, opts, model_defaults=loaded.decode_defaults)
    constraint = RowConstraint(compiled.row(), compiled.closing)
    return GenerationRequest(rid, _prompt(loaded), params, max_tokens, constraint=constraint)


def _valid(kind: str, text: str, schema: dict | None = None) -> None:
    if kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES, text
    else:
        jsonschema.validate(json.loads(text), schema)


CASES = [("json", SCHEMAS["nested"]), ("json", SCHEMAS["pattern"]), ("regex", None), ("choice", None)]


def _cases(engine, preset, temperature, max_tokens=96, **opts):
    reqs, kinds = [], {}
    for n, (kind, schema) in enumerate(CASES):
        rid = f"{kind}{n}@{temperature}"
        compiled = _compile(engine, kind, max_tokens, schema)
        reqs.append(
            _request(engine, rid, compiled, preset, max_tokens, temperature=temperature, seed=n, **opts)
        )
        kinds[rid] = (kind, schema)
    return reqs, kinds


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_gives_valid_output_at_temperature_0_and_1(labs, preset):
    engine = _engine(labs)
    reqs, kinds = [], {}
    for temperature in (0.0, 1.0):
        more, more_kinds = _cases(engine, preset, temperature)
        reqs += more
        kinds |= more_kinds
    results = _run(engine, reqs)
    for rid, res in results.items():
        text = labs.tokenizer.decode(res.token_ids)
        assert res.finish_reason == "stop", (rid, text)
        assert len(res.token_ids) < 96
        _valid(*kinds[rid][:1], text, kinds[rid][1])


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_constrained_speculation_equals_constrained_ar_at_temperature_0(labs, threshold):
    """Every schema of the shared set, a regex and a choice: the same tokens from both presets."""
    engine = _engine(labs)
    names = list(SCHEMAS)
    outputs = {}
    for preset, opts in (("nemotron_labs_ar", {}), ("nemotron_labs_spec", {"threshold": threshold})):
        reqs = [
            _request(engine, name, _compile(engine, "json", 96, SCHEMAS[name]), preset, 96, **opts)
            for name in names
        ]
        reqs += [
            _request(engine, kind, _compile(engine, kind, 24), preset, 24, **opts)
            for kind in ("regex", "choice")
        ]
        outputs[preset] = _run(engine, reqs)
    ar, spec = outputs["nemotron_labs_ar"], outputs["nemotron_labs_spec"]
    for rid in ar:
        assert spec[rid].token_ids == ar[rid].token_ids, rid
        assert spec[rid].finish_reason == ar[rid].finish_reason == "stop", rid
    assert any(len(r.token_ids) > 20 for r in ar.values())  # long outputs, not only forced text


@pytest.mark.parametrize("preset", PRESETS)
def test_constraints_never_change_an_unconstrained_row(labs, preset):
    """The same free request alone and batched with constrained rows: the same tokens and forwards."""
    params = resolve_params(
        preset, labs.family, 48, {"temperature": 1.0, "seed": 11}, model_defaults=labs.decode_defaults
    )

    def free() -> GenerationRequest:
        return GenerationRequest("free", _prompt(labs, "Copy the list: a b c d"), params, 48)

    alone = _run(_engine(labs), [free()])["free"]
    engine = _engine(labs)
    constrained, kinds = _cases(engine, preset, 1.0)
    together = _run(engine, [constrained[0], free(), *constrained[1:]])
    assert together["free"].token_ids == alone.token_ids
    assert together["free"].forwards == alone.forwards
    for rid, (kind, schema) in kinds.items():
        _valid(kind, labs.tokenizer.decode(together[rid].token_ids), schema)


@pytest.mark.parametrize("preset", PRESETS)
def test_output_closes_within_a_tight_max_tokens(labs, preset):
    """An unbounded string and a canvas barely longer than the shortest output: the row closes."""
    engine = _engine(labs)
    schema = {
        "type": "object",
        "properties": {"text": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["text", "n"],
    }
    shortest = _compile(engine, "json", 64, schema).min_tokens
    assert shortest is not None
    limit = shortest + 3
    reqs = [
        _request(
            engine, f"s{s}", _compile(engine, "json", limit, schema), preset, limit, temperature=1.0, seed=s
        )
        for s in range(4)
    ]
    for rid, res in _run(engine, reqs).items():
        assert res.finish_reason == "stop" and len(res.token_ids) < limit, rid
        jsonschema.validate(json.loads(labs.tokenizer.decode(res.token_ids)), schema)


def test_diffusion_block_openings_are_the_grammar_masked_causal_choice(labs):
    """Temperature 0, an upper-case regex for prompts that ask for lower case (the model's causal
    choice is refused where it is free): the token that opens each block after the first is the
    argmax of the causal logits within the grammar's allowed set, recomputed here without a cache."""
    engine = _engine(labs)
    tok = labs.tokenizer
    pattern = r"[A-Z]( [A-Z]){79}"
    vocab = grammar.vocab_for(tok, engine.runner.stop_ids)
    compiled = grammar.regex(pattern, vocab, 128)
    params = resolve_params("nemotron_labs", labs.family, 128, {}, model_defaults=labs.decode_defaults)
    letters = "abcdefghijklmnopqrst"
    prompts = [
        _prompt(labs, "Copy the list: " + " ".join(letters[i:] + letters[:i])) for i in range(0, 20, 5)
    ]
    reqs = [
        GenerationRequest(f"p{i}", p, params, 128, constraint=RowConstraint(compiled.row(), compiled.closing))
        for i, p in enumerate(prompts)
    ]
    results = _run(engine, reqs)
    checked = 0
    for i, prompt in enumerate(prompts):
        out = results[f"p{i}"].token_ids
        assert re.fullmatch(pattern, tok.decode(out))
        matcher = compiled.row()
        for pos, token in enumerate(out):
            if pos and pos % params.block_length == 0:  # a block opened by a causal forward
                ids = prompt + out[:pos]
                n = len(ids)
                with torch.no_grad():
                    logits = labs.model(
                        torch.tensor([ids]), torch.arange(n)[None], torch.ones(n, n).tril().bool()[None]
                    )[0, -1]
                allowed = torch.from_numpy(vocab.unpack(matcher.allowed_words()))
                assert int(logits.masked_fill(~allowed, float("-inf")).argmax()) == token, (i, pos)
                checked += 1
            assert matcher.consume(token)
    assert checked >= 8


def test_causal_grammar_masks_read_nothing_back():
    """On meta tensors (no values: a read-back raises, see test_no_readback.py) the masks of a
    verify forward, several positions of one row plus another row's, apply to the batch's logits:
    the mask adds no synchronisation to a causal step."""
    words = np.zeros(12, dtype=np.uint32)
    guide = FrontierGuide.at(
        [(0, 0, words), (0, 1, words), (0, 2, words), (2, 0, words)], torch.device("meta")
    )
    assert guide is not None
    logits = torch.zeros(3, 8, 384, device="meta")
    assert guide.mask(logits).shape == (3, 8, 384)
    assert FrontierGuide.at([], torch.device("meta")) is None
