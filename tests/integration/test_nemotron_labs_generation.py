"""Nemotron-Labs-Diffusion end to end with the bundled tiny-nemotron-labs.

- Its default preset (``nemotron_labs``, diffusion over a causal committed context) reaches >= 95 %
  on 200 held-out prompts at short and long ``max_tokens``; the AR and self-speculative presets
  answer as well, and self-speculation takes fewer forwards than AR for the same tokens.
- A real server gives the openai client, streamed or not, exactly the offline engine's answer for
  each of the three presets; the ``nemotron`` preset is a 400 listing the valid names.
- ``/v1/loglikelihood`` and ``echo`` + ``logprobs`` return the exact autoregressive log-probabilities
  (computed here from the model with a causal mask).
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from dllm_serve.bench.tasks import heldout_examples
from dllm_serve.commands import evaluate
from dllm_serve.config import EngineConfig
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.loader import load_model
from tests.nemotron_labs_helpers import TINY_LABS

PRESETS = ("nemotron_labs", "nemotron_labs_ar", "nemotron_labs_spec")


@pytest.fixture(scope="module")
def loaded():
    return load_model(TINY_LABS)


def chat(tok, text: str) -> list[int]:
    return tok.render_chat([{"role": "user", "content": text}])


@pytest.mark.parametrize("max_tokens", [64, 512])
def test_tiny_nemotron_labs_accuracy_with_its_default_preset(loaded, max_tokens):
    engine = Engine(loaded, EngineConfig(max_batch_size=64))
    assert engine.default_algorithm == "nemotron_labs"
    report = evaluate(engine, "nemotron_labs", 200, max_tokens, {})
    assert report["accuracy"] >= 95.0, report
    assert report["tokens_per_forward"] > 2.0, report  # several tokens per forward


def test_ar_and_self_speculation_answer_alike_and_speculation_saves_forwards(loaded):
    reports = {
        name: evaluate(Engine(loaded, EngineConfig(max_batch_size=64)), name, 100, 64, {})
        for name in ("nemotron_labs_ar", "nemotron_labs_spec")
    }
    ar, spec = reports["nemotron_labs_ar"], reports["nemotron_labs_spec"]
    assert ar["accuracy"] >= 95.0 and spec["accuracy"] == ar["accuracy"], reports  # lossless
    assert ar["tokens_per_forward"] <= 1.0 < spec["tokens_per_forward"], reports


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory("--model-path", str(TINY_LABS))


def test_the_three_presets_over_the_api_equal_the_offline_engine(server, loaded):
    tok = loaded.tokenizer
    engine = Engine(loaded, EngineConfig(max_batch_size=4))
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
    algorithms = httpx.get(server.v1 + "/algorithms").json()
    assert algorithms["default"] == "nemotron_labs"
    assert {a["name"] for a in algorithms["data"]} == set(PRESETS)
    for algorithm, ex in zip(PRESETS, heldout_examples(3, seed=12), strict=True):
        params = engine.resolve_params(40, {"seed": 0}, algorithm)
        want = engine.run_to_completion([GenerationRequest("q", chat(tok, ex.prompt), params, 40)])["q"]
        text = tok.decode(want.token_ids)
        messages = [{"role": "user", "content": ex.prompt}]
        body = {"algorithm": algorithm}
        reply = client.chat.completions.create(
            model="tiny-nemotron-labs", messages=messages, max_tokens=40, seed=0, extra_body=body
        )
        assert reply.choices[0].message.content == text, algorithm
        assert reply.choices[0].finish_reason == want.finish_reason
        assert reply.model_extra["diffusion"]["algorithm"] == algorithm
        assert reply.model_extra["diffusion"]["forwards"] == want.forwards
        stream = client.chat.completions.create(
            model="tiny-nemotron-labs", messages=messages, max_tokens=40, seed=0, stream=True, extra_body=body
        )
        deltas = [c.delta.content or "" for chunk in stream for c in chunk.choices]
        assert "".join(deltas) == text, algorithm


def test_the_older_nemotron_preset_is_a_400_listing_the_valid_names(server):
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny-nemotron-labs",
            messages=[{"role": "user", "content": "Copy the list: a b"}],
            max_tokens=8,
            extra_body={"algorithm": "nemotron"},
        )
    body = err.value.response.json()["error"]
    assert body["param"] == "algorithm" and "nemotron_labs_spec" in body["message"], body


@pytest.mark.parametrize("algorithm", ["nemotron_labs", "nemotron_labs_ar", "nemotron_labs_spec"])
def test_an_output_constraint_is_a_400_naming_the_algorithm_and_the_server_keeps_serving(server, algorithm):
    """The causal forwards of these presets do not apply a grammar: refused, never unenforced."""
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Copy the list: a b"}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny-nemotron-labs",
            messages=messages,
            max_tokens=32,
            response_format={"type": "json_object"},
            extra_body={"algorithm": algorithm},
        )
    body = err.value.response.json()["error"]
    assert body["param"] == "algorithm" and algorithm in body["message"], body
    ok = client.chat.completions.create(
        model="tiny-nemotron-labs", messages=messages, max_tokens=8, extra_body={"algorithm": algorithm}
    )
    assert ok.choices[0].finish_reason in {"stop", "length"}


def test_likelihood_and_echo_logprobs_are_the_exact_autoregressive_ones(server, loaded):
    tok = loaded.tokenizer
    ex = heldout_examples(1, seed=13)[0]
    context = chat(tok, ex.prompt)
    answer = tok.encode(ex.answer)
    ids = context + answer
    n = len(ids)
    with torch.no_grad():
        logits = loaded.model(
            torch.tensor([ids]), torch.arange(n)[None], torch.ones(n, n).tril().bool()[None]
        )
    logp = logits[0].double().log_softmax(-1)
    exact = [float(logp[i - 1, ids[i]]) for i in range(len(context), n)]
    reply = httpx.post(
        server.v1 + "/loglikelihood",
        json={"requests": [{"context": context, "continuation": answer}], "check_greedy": True},
        timeout=120,
    ).json()
    result = reply["data"][0]
    assert result["logprob"] == pytest.approx(sum(exact), abs=1e-3), reply
    assert result["stderr"] == 0.0
    assert result["is_greedy"] == all(int(logp[i - 1].argmax()) == ids[i] for i in range(len(context), n))
    echo = httpx.post(
        server.v1 + "/completions",
        json={"model": "tiny-nemotron-labs", "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0},
        timeout=120,
    ).json()
    token_logprobs = echo["choices"][0]["logprobs"]["token_logprobs"]
    assert token_logprobs[0] is None
    assert token_logprobs[len(context) :] == pytest.approx(exact, abs=1e-3)
