"""Dream end to end: the bundled tiny-dream (shifted logits), its presets, batching and the API.

- Dream's own sampler (``dream_entropy``, one token per step) reaches >= 95 % on 200 held-out
  prompts; every fast preset (prefix/dual cache, dInfer) stays within 2 points of it with fewer
  forwards per token. A cached block step reads the block's first position from the query before
  the block (the logits are shifted), checked where cached steps commit most tokens.
- The default preset keeps >= 95 % at any max_tokens up to 512.
- A request's tokens do not depend on its batch, for every preset, greedy and sampled.
- A real server gives the openai client the offline engine's answer (streamed or not), serves
  ``n``, stop strings and Dream's own presets and knobs per request, refuses bad ones with a 400,
  and ``dllm-serve models`` lists the Dream presets.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest

from dllm_serve.bench.tasks import heldout_examples
from dllm_serve.commands import evaluate
from dllm_serve.config import EngineConfig
from dllm_serve.engine.algorithms import presets_for
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.loader import load_model
from tests.dream_helpers import TINY_DREAM

PROMPTS = 200
GEN_LENGTH = 32
REFERENCE = "dream_entropy"  # Dream's recommended alg (its README), greedy, one token per step
FAST = ["prefix_cache", "dual_cache", "dinfer_blockwise", "dinfer_hierarchy", "dinfer_credit"]


@pytest.fixture(scope="module")
def loaded():
    return load_model(TINY_DREAM)


@pytest.fixture(scope="module")
def reports(loaded):
    out = {}
    for preset in (REFERENCE, *FAST):
        out[preset] = evaluate(
            Engine(loaded, EngineConfig(max_batch_size=64)), preset, PROMPTS, GEN_LENGTH, {}
        )
    return out


def test_dreams_own_sampler_accuracy(reports):
    ref = reports[REFERENCE]
    assert ref["num_prompts"] >= 200 and ref["params"]["shift_logits"] is True
    assert ref["accuracy"] >= 95.0, ref
    assert ref["params"]["steps"] == ref["params"]["gen_length"] == ref["params"]["block_length"]


@pytest.mark.parametrize("preset", FAST)
def test_fast_preset_keeps_quality_with_fewer_forwards(reports, preset):
    ref, fast = reports[REFERENCE], reports[preset]
    assert fast["params"]["block_length"] == 32 and fast["params"]["shift_logits"] is True
    assert fast["accuracy"] >= ref["accuracy"] - 2.0, (preset, fast["accuracy"], ref["accuracy"])
    assert fast["forwards_per_token"] <= 0.5 * ref["forwards_per_token"], fast


def test_cached_block_steps_read_the_shifted_logits(loaded):
    """Blocks of 8, one token per step (the schedule rule): a block's refresh forward commits one
    token and its other seven are committed by cached steps, so a block's first position is usually
    committed by a cached step, which must read it from the query before the block. (Read from the
    position itself, as a cache without the shift would, these presets score 1 %.)"""
    for preset in ("prefix_cache", "dual_cache"):
        engine = Engine(loaded, EngineConfig(max_batch_size=64))
        overrides = {"rule": "schedule", "steps": GEN_LENGTH, "block_length": 8}
        report = evaluate(engine, preset, 100, GEN_LENGTH, overrides)
        assert report["accuracy"] >= 95.0, (preset, report)


@pytest.mark.parametrize("max_tokens", [32, 256, 512])
def test_default_preset_at_any_canvas(loaded, max_tokens):
    """benchmarks/canvas_cpu.md has every max_tokens from 32 to 512."""
    engine = Engine(loaded, EngineConfig(max_batch_size=64))
    assert engine.default_algorithm == "dinfer_blockwise"
    report = evaluate(engine, engine.default_algorithm, PROMPTS, max_tokens, {})
    assert report["accuracy"] >= 95.0, report


def test_batch_invariance_across_presets(loaded):
    """A request's tokens are the same alone and in a mixed batch of every preset (float32)."""
    examples = heldout_examples(4, seed=5)
    engine = Engine(loaded, EngineConfig())
    requests = []
    for i, preset in enumerate(p.name for p in presets_for("dream")):
        for j, temperature in enumerate((0.0, 0.8)):
            ex = examples[(i + j) % len(examples)]
            max_tokens = (24, 40, 32)[(i + j) % 3]
            overrides = {"temperature": temperature, "seed": 10 * i + j}
            if not preset.startswith("dream_"):
                overrides["block_length"] = (8, 16)[(i + j) % 2]
            params = engine.resolve_params(max_tokens, overrides, algorithm=preset)
            prompt = loaded.tokenizer.render_chat([{"role": "user", "content": ex.prompt}])
            requests.append(GenerationRequest(f"{preset}-{j}", prompt, params, max_tokens))
    together = Engine(loaded, EngineConfig(max_batch_size=len(requests))).run_to_completion(requests)
    for req in requests:
        alone = Engine(loaded, EngineConfig()).run_to_completion([req])[req.request_id]
        assert together[req.request_id].token_ids == alone.token_ids, req.request_id
        assert together[req.request_id].forwards == alone.forwards, req.request_id


# -- the API ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory("--model-path", str(TINY_DREAM))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def test_chat_completions_streamed_or_not_equal_the_offline_engine(server, client, loaded):
    tok = loaded.tokenizer
    engine = Engine(loaded, EngineConfig(max_batch_size=4))
    examples = heldout_examples(3, seed=11)
    params = engine.resolve_params(48, {"seed": 0})
    requests = [
        GenerationRequest(f"q{i}", tok.render_chat([{"role": "user", "content": ex.prompt}]), params, 48)
        for i, ex in enumerate(examples)
    ]
    offline = engine.run_to_completion(requests)
    assert client.models.list().data[0].id == "tiny-dream"
    assert httpx.get(server.v1 + "/algorithms").json()["default"] == "dinfer_blockwise"
    for ex, req in zip(examples, requests, strict=True):
        want = offline[req.request_id]
        text = tok.decode(want.token_ids)
        assert text == ex.answer  # the bundled model answers these
        messages = [{"role": "user", "content": ex.prompt}]
        reply = client.chat.completions.create(model="tiny-dream", messages=messages, max_tokens=48, seed=0)
        assert reply.choices[0].message.content == text
        assert reply.choices[0].finish_reason == want.finish_reason == "stop"
        assert reply.usage.completion_tokens == len(want.token_ids) + 1  # the end-of-turn counts
        stream = client.chat.completions.create(
            model="tiny-dream", messages=messages, max_tokens=48, seed=0, stream=True
        )
        deltas = [c.delta.content or "" for chunk in stream for c in chunk.choices]
        assert "".join(deltas) == text


@pytest.mark.parametrize("algorithm", ["entropy", "dream_maskgit_plus", "topk_margin", "origin"])
def test_dreams_own_presets_per_request(client, algorithm):
    ex = heldout_examples(1, seed=3)[0]
    reply = client.chat.completions.create(
        model="tiny-dream",
        messages=[{"role": "user", "content": ex.prompt}],
        max_tokens=32,
        seed=1,
        extra_body={"algorithm": algorithm, "top_k": 20, "alg_temp": 0.0, "eps": 1e-3},
    )
    diffusion = reply.model_extra["diffusion"]
    assert diffusion["algorithm"].endswith(algorithm)
    assert reply.choices[0].message.content == ex.answer


@pytest.mark.parametrize("algorithm", ["dream_entropy", "dream_origin", "dual_cache"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_json_schema_holds_on_dream_presets(client, algorithm, temperature):
    """The grammar mask at the frontier applies to the shifted logits of Dream's own sampler too."""
    schema = {
        "type": "object",
        "properties": {"letters": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}}},
        "required": ["letters"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model="tiny-dream",
        messages=[{"role": "user", "content": "Copy the list: a b c"}],
        max_tokens=64,
        temperature=temperature,
        seed=2,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "letters", "schema": schema, "strict": True},
        },
        extra_body={"algorithm": algorithm},
    )
    value = json.loads(reply.choices[0].message.content)
    assert set(value) == {"letters"} and set(value["letters"]) <= {"a", "b", "c"}, value
    assert reply.choices[0].finish_reason == "stop"


def test_n_choices_and_stop_strings(client):
    ex = heldout_examples(1, seed=4)[0]
    messages = [{"role": "user", "content": ex.prompt}]
    reply = client.chat.completions.create(
        model="tiny-dream", messages=messages, max_tokens=32, n=3, temperature=0.7, seed=2
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.finish_reason == "stop" and c.message.content for c in reply.choices)
    cut = ex.answer[: len(ex.answer) // 2 + 1]
    stop = ex.answer[len(cut) : len(cut) + 1]
    stopped = client.chat.completions.create(
        model="tiny-dream", messages=messages, max_tokens=32, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == ex.answer[: ex.answer.index(stop)]


@pytest.mark.parametrize(
    ("field", "value"), [("top_k", -1), ("alg_temp", -1.0), ("eps", 1.5), ("algorithm", "nemotron")]
)
def test_bad_dream_fields_are_400s_naming_the_field(client, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny-dream",
            messages=[{"role": "user", "content": "Copy the list: a b"}],
            max_tokens=8,
            extra_body={field: value},
        )
    body = err.value.response.json()["error"]
    assert body["type"] == "invalid_request_error" and body["param"] == field, body


def test_models_command_lists_the_dream_presets():
    proc = subprocess.run(
        [sys.executable, "-m", "dllm_serve.cli", "models", "--model-path", str(TINY_DREAM)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["family"] == "dream"
    names = {a["name"]: a for a in report["algorithms"]}
    assert {"dream_origin", "dream_maskgit_plus", "dream_topk_margin", "dream_entropy"} <= set(names)
    assert {"dual_cache", "dinfer_blockwise"} <= set(names) and "nemotron" not in names
    assert names["dream_entropy"]["defaults"]["block_length"] is None  # the whole canvas


def test_algorithms_listing_shows_the_checkpoints_defaults(server):
    """GET /v1/algorithms (and so the playground) shows what a request that sets nothing gets: Dream's
    shifted logits come from the checkpoint, not from any preset."""
    listing = httpx.get(server.v1 + "/algorithms", timeout=10).json()["data"]
    assert listing and all(p["defaults"]["shift_logits"] is True for p in listing)
