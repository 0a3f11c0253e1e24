"""LLaDA2.x end to end on the bundled tiny-llada2: accuracy, and a real server driven by openai.

- tiny-llada2 reaches >= 95 % exact match on 200 held-out prompts with its default preset
  (``llada2``) at max_tokens 32 and 512 (benchmarks/raw/canvas_accuracy_tiny-llada2.json has every
  canvas in between).
- The server gives the openai client, streamed or not, exactly the offline engine's answer for the
  LLaDA2.0 preset and for LLaDA2.1's editing preset; with editing, streamed text arrives only as
  whole blocks become final (never a token that is later edited).
- Presets of other families are 400s listing the valid names; /v1/algorithms lists the LLaDA2
  presets with their defaults.
- Structured output works on the presets without editing (the aligned step goes through the same
  grammar hook; the first block holds the prompt's tail); the editing preset, which may rewrite
  committed tokens the grammar has accepted, refuses a constraint with a 400 naming the algorithm.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from dllm_serve.bench.tasks import heldout_examples
from dllm_serve.commands import evaluate
from dllm_serve.config import EngineConfig
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.loader import load_model
from tests.llada2_helpers import TINY_LLADA2


@pytest.fixture(scope="module")
def loaded():
    return load_model(TINY_LLADA2)


@pytest.mark.parametrize("max_tokens", [32, 512])
def test_tiny_llada2_accuracy_with_its_default_preset(loaded, max_tokens):
    engine = Engine(loaded, EngineConfig(max_batch_size=64))
    assert engine.default_algorithm == "llada2"
    report = evaluate(engine, "llada2", 200, max_tokens, {}, "standard")
    assert report["accuracy"] >= 95.0, report


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory("--model-path", str(TINY_LLADA2))


@pytest.mark.parametrize("algorithm", ["llada2", "llada2_quality"])
def test_chat_streamed_or_not_equals_the_offline_engine(server, loaded, algorithm):
    tok = loaded.tokenizer
    engine = Engine(loaded, EngineConfig(max_batch_size=4))
    examples = heldout_examples(3, seed=5)
    params = engine.resolve_params(48, {"seed": 0}, algorithm)
    prompts = [tok.render_chat([{"role": "user", "content": ex.prompt}]) for ex in examples]
    requests = [GenerationRequest(f"q{i}", p, params, 48) for i, p in enumerate(prompts)]
    offline = engine.run_to_completion(requests)

    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
    for ex, req in zip(examples, requests, strict=True):
        want = offline[req.request_id]
        text = tok.decode(want.token_ids)
        messages = [{"role": "user", "content": ex.prompt}]
        extra = {"algorithm": algorithm}
        reply = client.chat.completions.create(
            model="tiny-llada2", messages=messages, max_tokens=48, seed=0, extra_body=extra
        )
        assert reply.choices[0].message.content == text
        assert reply.choices[0].finish_reason == want.finish_reason
        assert reply.model_extra["diffusion"]["algorithm"] == algorithm
        assert reply.model_extra["diffusion"]["forwards"] == want.forwards
        stream = client.chat.completions.create(
            model="tiny-llada2", messages=messages, max_tokens=48, seed=0, stream=True, extra_body=extra
        )
        deltas = [c.delta.content or "" for chunk in stream for c in chunk.choices]
        assert "".join(deltas) == text


def test_other_families_presets_are_400_and_algorithms_lists_llada2(server):
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)
    for name in ("dual_cache", "nemotron"):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="tiny-llada2",
                messages=[{"role": "user", "content": "Copy the list: a b"}],
                max_tokens=8,
                extra_body={"algorithm": name},
            )
        body = err.value.response.json()["error"]
        assert body["param"] == "algorithm" and "llada2_quality" in body["message"], body
    listing = httpx.get(server.v1 + "/algorithms").json()
    assert listing["default"] == "llada2"
    names = {a["name"]: a for a in listing["data"]}
    assert set(names) == {"llada2", "llada2_quality", "llada2_speed"}
    assert names["llada2_quality"]["defaults"]["editing_threshold"] == 0.5


@pytest.mark.parametrize("algorithm", ["llada2", "llada2_speed"])
def test_json_object_on_the_presets_without_editing(server, algorithm):
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model="tiny-llada2",
        messages=[{"role": "user", "content": "JSON please"}],
        response_format={"type": "json_object"},
        max_tokens=64,
        temperature=1.0,
        seed=3,
        extra_body={"algorithm": algorithm},
    )
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    assert reply.choices[0].finish_reason == "stop"


def test_a_constraint_on_the_editing_preset_is_a_400(server):
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny-llada2",
            messages=[{"role": "user", "content": "JSON please"}],
            response_format={"type": "json_object"},
            max_tokens=64,
            extra_body={"algorithm": "llada2_quality"},
        )
    body = err.value.response.json()["error"]
    assert body["param"] == "algorithm" and "llada2_quality" in body["message"], body
    assert httpx.get(server.base_url + "/health").status_code == 200
