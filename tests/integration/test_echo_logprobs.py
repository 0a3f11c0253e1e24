"""/v1/completions with echo and logprobs (lm-eval's local-completions form) on real servers.

Every expected number is computed from the model in this process, never hard-coded.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from dllm_serve.bench.tasks import heldout_examples
from dllm_serve.decoding.likelihood import block_spans
from dllm_serve.models.loader import load_model
from tests.helpers import TINY_LLADA
from tests.likelihood_reference import masked_logprobs
from tests.nemotron_helpers import TINY_NEMOTRON
from tests.sdar_helpers import TINY_SDAR

MODELS = {"llada": (TINY_LLADA, None), "nemotron": (TINY_NEMOTRON, 32), "sdar": (TINY_SDAR, 4)}


@pytest.fixture(scope="module", params=sorted(MODELS))
def served(request, server_factory):
    path, block = MODELS[request.param]
    return server_factory("--model-path", str(path)), load_model(path), block


def _prompt(loaded) -> list[int]:
    ex = heldout_examples(1)[0]
    tok = loaded.tokenizer
    return tok.render_chat([{"role": "user", "content": ex.prompt}]) + tok.encode(ex.answer)


def _model(server) -> str:
    """The served model's id (the API requires ``model``)."""
    return httpx.get(server.v1 + "/models", timeout=10).json()["data"][0]["id"]


def _each_token_alone_masked(model, prompt: list[int], block: int | None) -> list[float | None]:
    """Reference: token i's log-probability with it alone masked (block diffusion: its block
    after the clean prompt before it)."""
    out: list[float | None] = [None]
    for s, e in block_spans(len(prompt), block):
        idx = [(i - s,) for i in range(max(s, 1), e)]
        if idx:
            out += masked_logprobs(model, prompt[:s], prompt[s:e], (0, e - s), idx, block, 0.0)
    return out


def test_echo_returns_each_prompt_token_alone_masked_and_one_greedy_token(served):
    server, loaded, block = served
    prompt = _prompt(loaded)
    body = httpx.post(
        server.v1 + "/completions",
        json={
            "model": _model(server),
            "prompt": prompt,
            "max_tokens": 1,
            "logprobs": 3,
            "echo": True,
            "temperature": 0,
            "seed": 1,
        },
        timeout=120,
    ).json()
    choice = body["choices"][0]
    lp = choice["logprobs"]
    want = _each_token_alone_masked(loaded.model, prompt, block)
    assert len(lp["token_logprobs"]) == len(prompt) + 1 == len(lp["tokens"]) == len(lp["top_logprobs"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for got, ref in zip(lp["token_logprobs"][1 : len(prompt)], want[1:], strict=True):
        assert got == pytest.approx(ref, abs=1e-4)
    for got, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
        assert 1 <= len(top) <= 3 and max(top.values()) >= got - 1e-9
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert body["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": 1,
        "total_tokens": len(prompt) + 1,
    }
    assert choice["text"].startswith(loaded.tokenizer.decode(prompt))


def test_lm_eval_greedy_check_is_exact_for_argmax_tokens(served):
    """lm-eval compares token_logprob with max(top_logprobs.values()): equal when the token is the argmax."""
    server, loaded, _ = served
    prompt = _prompt(loaded)
    lp = httpx.post(
        server.v1 + "/completions",
        json={"model": _model(server), "prompt": prompt, "max_tokens": 1, "logprobs": 1, "echo": True},
        timeout=120,
    ).json()["choices"][0]["logprobs"]
    answer = len(loaded.tokenizer.encode(heldout_examples(1)[0].answer))
    greedy = [
        t == max(top.values())
        for t, top in zip(
            lp["token_logprobs"][-answer - 1 : -1], lp["top_logprobs"][-answer - 1 : -1], strict=True
        )
    ]
    assert sum(greedy) >= answer // 2  # a trained model predicts most answer tokens from the rest


def test_openai_client_echo_with_max_tokens_zero_scores_the_prompt_only(served):
    server, loaded, _ = served
    client = openai.OpenAI(base_url=server.v1, api_key="x")
    text = "Copy the list: a b c"
    r = client.completions.create(
        model=server.health()["model"], prompt=[text, text + " d"], max_tokens=0, echo=True, logprobs=0
    )
    n = len(loaded.tokenizer.encode(text))
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
    assert len(r.choices[0].logprobs.token_logprobs) == n and r.choices[0].logprobs.top_logprobs[1] is None
    assert r.usage.completion_tokens == 0
    # Text only: echo without logprobs needs no model work.
    plain = client.completions.create(model=server.health()["model"], prompt=text, max_tokens=0, echo=True)
    assert plain.choices[0].text == text and plain.choices[0].logprobs is None
    # With one token and no logprobs the token is the same (conditioned on the whole prompt).
    one = client.completions.create(model=server.health()["model"], prompt=text, max_tokens=1, echo=True)
    scored = client.completions.create(
        model=server.health()["model"], prompt=text, max_tokens=1, echo=True, logprobs=1
    )
    assert one.choices[0].text == scored.choices[0].text and one.usage.completion_tokens == 1


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 2}, "max_tokens"),
        ({"max_tokens": 1, "stream": True}, "stream"),
        ({"max_tokens": 1, "n": 2}, "n"),
        ({"max_tokens": 1, "logprobs": 21}, "logprobs"),
        ({"max_tokens": 0, "echo": False}, "max_tokens"),
    ],
)
def test_echo_errors_name_the_field(served, fields, param):
    server, _, _ = served
    r = httpx.post(
        server.v1 + "/completions",
        json={"model": _model(server), "prompt": "a b", "echo": True, "logprobs": 1, **fields},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
