"""logprobs / top_logprobs of generated tokens in chat and completions, streamed and not, through the
openai client against a real server (tiny-llada, default preset)."""

from __future__ import annotations

import httpx
import openai
import pytest

from dllm_serve.bench.tasks import heldout_examples
from dllm_serve.models.tokenizer import ChatTokenizer
from tests.helpers import TINY_LLADA


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory("--model-path", str(TINY_LLADA))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="x")


def _messages():
    return [{"role": "user", "content": heldout_examples(1)[0].prompt}]


def test_chat_logprobs_streamed_equal_the_non_streamed_ones(client):
    kwargs = dict(
        model="tiny-llada", messages=_messages(), max_tokens=32, logprobs=True, top_logprobs=3, seed=5
    )
    full = client.chat.completions.create(**kwargs)
    content = full.choices[0].logprobs.content
    assert "".join(e.token for e in content) == full.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= e.top_logprobs[0].logprob + 1e-6
        assert e.bytes == list(e.token.encode())
        assert [t.logprob for t in e.top_logprobs] == sorted(
            (t.logprob for t in e.top_logprobs), reverse=True
        )
    streamed = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model="tiny-llada", messages=_messages(), max_tokens=8)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_streamed_and_with_a_stop_string(client):
    prompt = ChatTokenizer(TINY_LLADA).hf.apply_chat_template(
        _messages(), tokenize=False, add_generation_prompt=True
    )
    r = client.completions.create(model="tiny-llada", prompt=prompt, max_tokens=16, logprobs=2, seed=1)
    lp = r.choices[0].logprobs
    returned = r.usage.completion_tokens - int(
        r.choices[0].finish_reason == "stop"
    )  # usage counts the stop token
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == returned > 2
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(
        len(t) <= 2 and max(t.values()) >= v - 1e-6
        for t, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    streamed = []
    for chunk in client.completions.create(
        model="tiny-llada", prompt=prompt, max_tokens=16, logprobs=2, seed=1, stream=True
    ):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.token_logprobs
    assert streamed == lp.token_logprobs
    if len(r.choices[0].text) > 2:  # a stop string: logprobs up to the token that completed it
        stop = r.choices[0].text[1:3]
        cut = client.completions.create(
            model="tiny-llada", prompt=prompt, max_tokens=16, logprobs=0, seed=1, stop=[stop]
        )
        assert len(cut.choices[0].logprobs.token_logprobs) == cut.usage.completion_tokens
        assert cut.choices[0].logprobs.top_logprobs == [None] * cut.usage.completion_tokens


def test_logprob_limits_are_400s(server):
    for body, param in (
        ({"messages": _messages(), "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": _messages(), "top_logprobs": 2}, "top_logprobs"),
        ({"messages": _messages(), "logprobs": 1}, "logprobs"),
    ):
        full = {"model": "tiny-llada", "max_tokens": 8, **body}
        r = httpx.post(server.v1 + "/chat/completions", json=full, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
