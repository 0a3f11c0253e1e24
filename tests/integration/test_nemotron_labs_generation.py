"""Nemotron-Labs-Diffusion end to end with the bundled tiny-nemotron-labs.

- Its default preset (``nemotron_labs``, diffusion over a causal committed context) reaches >= 95 %
  on 200 held-out prompts at short and long ``max_tokens``; the AR and self-speculative presets
  answer as well, and self-speculation takes fewer forwards than AR for the same tokens.
- A real server gives the openai client, streamed or not, exactly the offline engine's answer for
  each of the three presets; the ``nemotron`` preset is a 400 listing the valid names.
- Output constraints (``response_format``, ``guided_regex``, ``guided_choice``, a forced tool call)
  are enforced on all three presets over the API (engine-level tests: tests/unit/test_constrained_causal.py).
- ``/v1/loglikelihood`` and ``echo`` + ``logprobs`` return the exact autoregressive log-probabilities
  (computed here from the model with a causal mask).
"""

from __future__ import annotations

import re
from typing import Literal

import httpx
import openai
import pytest
import torch
from pydantic import BaseModel, Field

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


class Pair(BaseModel):
    word: str = Field(pattern=r"^[a-z]+$")
    count: int = Field(ge=0, le=99)


class Weather(BaseModel):
    """Get the weather for a city."""

    city: str
    unit: Literal["c", "f"]


@pytest.mark.parametrize("algorithm", PRESETS)
def test_output_constraints_are_enforced_over_the_api(server, algorithm):
    """Each preset through the openai client: ``.parse()`` with a pydantic model, a regex and a
    choice on completions, a named tool call streamed, at temperature 0 and 1; a max_tokens too
    small for the schema is a 400 (tiny-nemotron-labs never saw JSON: validity is the grammar's)."""
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
    body = {"algorithm": algorithm}
    model = "tiny-nemotron-labs"
    for temperature in (0.0, 1.0):
        out = client.chat.completions.parse(
            model=model,
            messages=[{"role": "user", "content": "A word and a count."}],
            response_format=Pair,
            temperature=temperature,
            seed=1,
            max_tokens=48,
            extra_body=body,
        )
        assert out.choices[0].finish_reason == "stop"
        assert isinstance(out.choices[0].message.parsed, Pair), out.choices[0].message.content
        regex = client.completions.create(
            model=model,
            prompt="Apples:",
            max_tokens=16,
            temperature=temperature,
            extra_body={**body, "guided_regex": r"[0-9]{1,3} apples"},
        )
        assert re.fullmatch(r"[0-9]{1,3} apples", regex.choices[0].text), regex.choices[0].text
        pick = client.completions.create(
            model=model,
            prompt="Pick",
            n=2,
            temperature=temperature,
            extra_body={**body, "guided_choice": ["yes", "no", "maybe"]},
        )
        assert {c.text for c in pick.choices} <= {"yes", "no", "maybe"}
    tools = [openai.pydantic_function_tool(Weather, name="get_weather")]
    named = {"type": "function", "function": {"name": "get_weather"}}
    with client.chat.completions.stream(
        model=model,
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=tools,
        tool_choice=named,
        temperature=1.0,
        max_tokens=128,
        extra_body=body,
    ) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert isinstance(calls[0].function.parsed_arguments, Weather)
    with pytest.raises(openai.BadRequestError, match="too small") as err:
        client.chat.completions.parse(
            model=model, messages=[{"role": "user", "content": "x"}], response_format=Pair, max_tokens=4
        )
    assert err.value.body["param"] == "max_tokens"


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
