"""SDAR end to end: the bundled tiny-sdar's and tiny-sdar-moe's accuracy with their default preset, a
real server for each answering the openai client (streamed or not) exactly as the offline engine
does, the presets' errors, and `dllm-serve models`. Likelihood scoring runs in
tests/integration/test_loglikelihood.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import openai
import pytest

from dllm_serve.bench.tasks import heldout_examples
from dllm_serve.commands import evaluate
from dllm_serve.config import EngineConfig
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.loader import load_model
from tests.sdar_helpers import TINY_SDAR, TINY_SDAR_MOE


@pytest.fixture(scope="module")
def loaded():
    return load_model(TINY_SDAR)


@pytest.mark.parametrize("max_tokens", [32, 160, 256, 512])
def test_tiny_sdar_accuracy_with_its_default_preset(loaded, max_tokens):
    engine = Engine(loaded, EngineConfig(max_batch_size=64))
    assert engine.default_algorithm == "sdar"
    report = evaluate(engine, "sdar", 200, max_tokens, {})
    assert report["accuracy"] >= 95.0, report
    assert report["tokens_per_forward"] > 1.0  # the threshold commits several tokens per step


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory("--model-path", str(TINY_SDAR))


@pytest.fixture(scope="module")
def moe_loaded():
    return load_model(TINY_SDAR_MOE)


@pytest.mark.parametrize("max_tokens", [32, 512])
def test_tiny_sdar_moe_accuracy_with_its_default_preset(moe_loaded, max_tokens):
    """The MoE variant (every max_tokens 32-512 in benchmarks/canvas_cpu.md): SDAR's preset as is."""
    engine = Engine(moe_loaded, EngineConfig(max_batch_size=64))
    assert moe_loaded.family == "sdar-moe" and engine.default_algorithm == "sdar"
    report = evaluate(engine, "sdar", 200, max_tokens, {})
    assert report["accuracy"] >= 95.0, report


def test_chat_completions_streamed_or_not_equal_the_offline_engine(server, loaded):
    _chat_equals_offline(server, loaded, "tiny-sdar")


def test_tiny_sdar_moe_serves_like_its_offline_engine(server_factory, moe_loaded):
    """One server of the MoE variant: the same API checks as tiny-sdar's, and its static preset."""
    server = server_factory("--model-path", str(TINY_SDAR_MOE))
    try:
        _chat_equals_offline(server, moe_loaded, "tiny-sdar-moe")
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)
        reply = client.completions.create(
            model="tiny-sdar-moe", prompt="Copy", max_tokens=8, extra_body={"algorithm": "sdar_static"}
        )
        assert reply.model_extra["diffusion"]["algorithm"] == "sdar_static"
        with pytest.raises(openai.BadRequestError):
            client.completions.create(
                model="tiny-sdar-moe", prompt="x", max_tokens=8, extra_body={"algorithm": "llada2"}
            )
    finally:
        server.stop()


def _chat_equals_offline(server, loaded, name: str) -> None:
    """Chat completions, plain and streamed, equal the offline engine's tokens for held-out prompts."""
    tok = loaded.tokenizer
    engine = Engine(loaded, EngineConfig(max_batch_size=4))
    examples = heldout_examples(4, seed=3)  # prompts of 32 and 38 tokens
    params = engine.resolve_params(40, {"seed": 0})
    assert params.block_length == 4 and params.cache == "aligned"
    prompts = [tok.render_chat([{"role": "user", "content": ex.prompt}]) for ex in examples]
    assert {len(p) % 4 for p in prompts} != {0}  # some answers start inside a prompt block
    requests = [GenerationRequest(f"q{i}", p, params, 40) for i, p in enumerate(prompts)]
    offline = engine.run_to_completion(requests)

    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
    assert client.models.list().data[0].id == name
    assert httpx.get(server.v1 + "/algorithms").json()["default"] == "sdar"
    for ex, req in zip(examples, requests, strict=True):
        want = offline[req.request_id]
        text = tok.decode(want.token_ids)
        assert text.strip() == ex.answer.strip()
        tokens = len(want.token_ids) + int(want.stopped_on_token)
        messages = [{"role": "user", "content": ex.prompt}]
        reply = client.chat.completions.create(model=name, messages=messages, max_tokens=40, seed=0)
        choice = reply.choices[0]
        assert choice.message.content == text and choice.finish_reason == want.finish_reason
        assert reply.usage.completion_tokens == tokens
        assert reply.model_extra["diffusion"]["algorithm"] == "sdar"
        assert reply.model_extra["diffusion"]["forwards"] == want.forwards

        stream = client.chat.completions.create(
            model=name,
            messages=messages,
            max_tokens=40,
            seed=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"algorithm": "low_confidence_dynamic"},
        )
        deltas, finish, usage = [], None, None
        for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                deltas.append(c.delta.content or "")
                finish = c.finish_reason or finish
        assert "".join(deltas) == text and finish == want.finish_reason
        assert usage is not None and usage.completion_tokens == tokens


def test_static_preset_by_name_and_other_families_presets_are_400(server):
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Copy the list: a b"}]
    reply = client.chat.completions.create(
        model="tiny-sdar", messages=messages, max_tokens=12, extra_body={"algorithm": "low_confidence_static"}
    )
    assert reply.model_extra["diffusion"]["algorithm"] == "sdar_static"
    for name in ("nemotron", "dual_cache"):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="tiny-sdar", messages=messages, max_tokens=8, extra_body={"algorithm": name}
            )
        body = err.value.response.json()["error"]
        assert body["type"] == "invalid_request_error" and body["param"] == "algorithm", body
        assert "valid for this model: sdar" in body["message"], body
    assert client.models.list().data  # still serving


@pytest.mark.parametrize(("model", "family"), [(TINY_SDAR, "sdar"), (TINY_SDAR_MOE, "sdar-moe")])
def test_models_command_lists_the_family_and_its_presets(model, family):
    proc = subprocess.run(
        [sys.executable, "-m", "dllm_serve.cli", "models", "--model-path", str(model)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["family"] == family
    assert [a["name"] for a in report["algorithms"]] == ["sdar", "sdar_static"]


def test_structured_output_under_aligned_blocks(server):
    """A JSON schema and a guided choice hold with SDAR's blocks of 4 (the grammar's frontier can
    sit in a block that starts inside the prompt)."""
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
        "required": ["city", "n"],
        "additionalProperties": False,
    }
    for seed in range(2):
        out = client.chat.completions.create(
            model="tiny-sdar",
            messages=[{"role": "user", "content": "Answer in JSON."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, "strict": True},
            },
            temperature=1.0,
            seed=seed,
            max_tokens=64,
        )
        value = json.loads(out.choices[0].message.content)
        assert set(value) == {"city", "n"} and isinstance(value["n"], int), value
    out = client.completions.create(
        model="tiny-sdar", prompt="Pick", n=3, temperature=1.0, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert {c.text for c in out.choices} <= {"yes", "no"}
