"""The OpenAI API end to end: a real server process driven by the official openai client.

The server runs the bundled tiny-llada architecture with random weights (``--load-format dummy``):
random weights rarely pick a stop token, so answers run to their full length and every streaming,
n, seed and stop-string property is exercised on long, byte-level-messy text.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

MODEL = "tiny-llada"
FAST = {"block_length": 8}


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory("--load-format", "dummy")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def _chat(client, content="Copy the list: a b c d", **kw):
    kw.setdefault("max_tokens", 32)
    extra = {**FAST, **kw.pop("extra_body", {})}
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], extra_body=extra, **kw
    )


def test_models_algorithms_health(server, client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    algos = httpx.get(server.v1 + "/algorithms").json()
    assert algos == httpx.get(server.base_url + "/generation/algorithms").json()
    names = {a["name"] for a in algos["data"]}
    assert {"llada", "prefix_cache", "dual_cache", "dinfer_blockwise", "dinfer_credit"} <= names
    assert algos["default"] == "dinfer_blockwise"
    llada = next(a for a in algos["data"] if a["name"] == "llada")
    assert "basic" in llada["aliases"] and "threshold" in llada["defaults"]
    health = server.health()
    assert health["status"] == "ready" and health["model"] == MODEL and health["device"] == "cpu"
    assert {"waiting", "running", "engine"} <= set(health)


def test_chat_completion_shape_and_usage(client) -> None:
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Copy the list: "}, {"type": "text", "text": "a b"}],
            },
        ],
        max_tokens=24,
        seed=1,
        extra_body=FAST,
    )
    assert resp.object == "chat.completion" and resp.model == MODEL and resp.id.startswith("chatcmpl-")
    (choice,) = resp.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 10
    if choice.finish_reason == "length":
        assert resp.usage.completion_tokens == 24
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    diffusion = resp.model_extra["diffusion"]
    assert diffusion["algorithm"] == "dinfer_blockwise" and diffusion["forwards"] >= 1
    assert diffusion["tokens_per_forward"] == pytest.approx(
        resp.usage.completion_tokens / diffusion["forwards"], rel=1e-3
    )


def test_default_max_tokens_is_128(client) -> None:
    resp = client.completions.create(
        model=MODEL, prompt="Sort the digits: 3 1 2", seed=0, extra_body={"block_length": 32}
    )
    if resp.choices[0].finish_reason == "length":
        assert resp.usage.completion_tokens == 128
    assert resp.usage.completion_tokens <= 128


def test_seed_reproducible_and_distinct(client) -> None:
    kw = {"temperature": 1.0, "max_tokens": 24}
    a = _chat(client, seed=11, **kw).choices[0].message.content
    b = _chat(client, seed=11, **kw).choices[0].message.content
    c = _chat(client, seed=12, **kw).choices[0].message.content
    assert a == b
    assert a != c


def test_n_choices_use_seed_plus_index(client) -> None:
    kw = {"temperature": 1.0, "max_tokens": 16, "extra_body": {"block_length": 8}}
    many = client.completions.create(model=MODEL, prompt=["Copy: a b", "Copy: c d"], n=2, seed=5, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    texts = [c.text for c in many.choices]
    assert len(set(texts)) == 4
    # choice k (prompt k // n) used seed 5 + k
    for k, prompt in enumerate(["Copy: a b", "Copy: a b", "Copy: c d", "Copy: c d"]):
        alone = client.completions.create(model=MODEL, prompt=prompt, seed=5 + k, **kw)
        assert alone.choices[0].text == texts[k]
    assert many.usage.completion_tokens == sum(
        client.completions.create(model=MODEL, prompt=p, seed=5 + k, **kw).usage.completion_tokens
        for k, p in enumerate(["Copy: a b", "Copy: a b", "Copy: c d", "Copy: c d"])
    )
    chat = _chat(client, n=3, seed=7, temperature=1.0)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert len({c.message.content for c in chat.choices}) == 3


def test_streaming_chat_deltas_arrive_early_and_match(client) -> None:
    kw = {"max_tokens": 64, "seed": 3, "extra_body": {"algorithm": "llada", "block_length": 8}}
    full = _chat(client, **kw)
    start = time.perf_counter()
    stream = _chat(client, stream=True, stream_options={"include_usage": True}, **kw)
    events = [(time.perf_counter(), chunk) for chunk in stream]
    first = events[0][1]
    assert first.choices[0].delta.role == "assistant"
    content = [(t, c.choices[0].delta.content) for t, c in events if c.choices and c.choices[0].delta.content]
    finals = [(t, c) for t, c in events if c.choices and c.choices[0].finish_reason]
    assert len(content) >= 3, "text should arrive in several deltas as blocks commit"
    (t_final, final), usage_chunk = finals[0], events[-1][1]
    assert final.choices[0].finish_reason == full.choices[0].finish_reason
    # the first delta came well before the end (8 blocks: it should be ~1/8 of the way in)
    assert t_final - content[0][0] > 0.25 * (t_final - start)
    assert "".join(d for _, d in content) == full.choices[0].message.content
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == full.usage.completion_tokens
    assert usage_chunk.model_extra["diffusion"]["forwards"] == full.model_extra["diffusion"]["forwards"]


def test_streaming_completions_n2(client) -> None:
    kw = {"max_tokens": 24, "seed": 9, "temperature": 1.0, "n": 2, "extra_body": FAST}
    full = client.completions.create(model=MODEL, prompt="Reverse the list: a b c", **kw)
    texts = {0: "", 1: ""}
    finish = {}
    for chunk in client.completions.create(model=MODEL, prompt="Reverse the list: a b c", stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert [texts[0], texts[1]] == [c.text for c in full.choices]
    assert [finish[0], finish[1]] == [c.finish_reason for c in full.choices]


def test_stop_strings(client) -> None:
    kw = {"max_tokens": 48, "seed": 4}
    full = _chat(client, **kw)
    text = full.choices[0].message.content
    # a stop string taken from the middle of the answer; nothing from it onwards comes back
    stop = next(
        text[i : i + 2]
        for i in range(8, len(text) - 2)
        if "\ufffd" not in text[i : i + 2] and text[i : i + 2].strip()
    )
    cut = text[: text.find(stop)]
    stopped = _chat(client, stop=[stop, "never-occurs"], **kw)
    assert stopped.choices[0].message.content == cut
    assert stopped.choices[0].finish_reason == "stop"
    assert 0 < stopped.usage.completion_tokens < full.usage.completion_tokens
    streamed = "".join(
        c.choices[0].delta.content or "" for c in _chat(client, stop=stop, stream=True, **kw) if c.choices
    )
    assert streamed == cut


def test_metrics_exposed(server, client) -> None:
    _chat(client, max_tokens=8)
    text = httpx.get(server.base_url + "/metrics").text
    for name in (
        "dllm_serve_requests_waiting",
        "dllm_serve_requests_running",
        'dllm_serve_requests_finished_total{reason="length"}',
        "dllm_serve_prompt_tokens_total",
        "dllm_serve_generation_tokens_total",
        "dllm_serve_forwards_total",
        "dllm_serve_tokens_per_forward_bucket",
        "dllm_serve_time_to_first_token_seconds_bucket",
        "dllm_serve_e2e_request_latency_seconds_bucket",
        "dllm_serve_batch_size_bucket",
    ):
        assert name in text, name


def test_prompts_and_outputs_not_logged(server, client) -> None:
    marker = "Copy the list: q x z SECRETMARKER"
    out = _chat(client, content=marker, max_tokens=16, seed=2).choices[0].message.content
    time.sleep(0.2)
    log = server.log()
    assert "SECRETMARKER" not in log
    assert out.strip() == "" or out not in log
