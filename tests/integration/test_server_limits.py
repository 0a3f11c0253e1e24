"""Cancellation, the waiting-queue bound (429), request timeouts and draining on shutdown.

The servers run one sequence at a time (``--max-batch-size 1``) and the requests are long (the
full-canvas ``llada`` preset, one forward per token), so a request that was not cancelled would
visibly hold the only slot.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import openai
import pytest

MODEL = "tiny-llada"
LONG = {"algorithm": "llada", "block_length": 32}  # 384 tokens -> 384 full-canvas forwards


def _long_chat(client: openai.OpenAI, **kw):
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Copy the list: a b c"}],
        max_tokens=kw.pop("max_tokens", 384),
        extra_body={**LONG, **kw.pop("extra_body", {})},
        **kw,
    )


def _wait_for(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _finished(server, reason: str) -> float:
    for line in httpx.get(server.base_url + "/metrics").text.splitlines():
        if line.startswith(f'dllm_serve_requests_finished_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory("--load-format", "dummy", "--max-batch-size", "1", "--max-queue", "2")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120)


def _idle(server) -> bool:
    h = server.health()
    return h["running"] == 0 and h["waiting"] == 0


def test_stream_disconnect_cancels_and_frees_the_slot(server, client) -> None:
    aborts = _finished(server, "abort")
    stream = _long_chat(client, stream=True)
    for chunk in stream:  # wait until it is really generating
        if chunk.choices and chunk.choices[0].delta.content:
            break
    assert server.health()["running"] == 1
    stream.close()
    freed = _wait_for(lambda: _idle(server), 5, "the cancelled sequence to leave the batch")
    assert freed < 2.0
    assert _finished(server, "abort") == aborts + 1
    # the only slot is free: a short request runs at once
    start = time.monotonic()
    resp = _long_chat(client, max_tokens=8, extra_body={"block_length": 8})
    assert resp.choices[0].finish_reason in ("stop", "length") and time.monotonic() - start < 10


def test_non_streaming_disconnect_cancels(server) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 384,
        **LONG,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.v1 + "/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    _wait_for(lambda: _idle(server), 5, "the abandoned request to be cancelled")


def test_full_queue_answers_429(server, client) -> None:
    streams = []
    try:
        streams.append(_long_chat(client, stream=True))  # running
        _wait_for(lambda: server.health()["running"] == 1, 10, "the first request to run")
        streams += [_long_chat(client, stream=True) for _ in range(2)]  # waiting: the queue is full
        _wait_for(lambda: server.health()["waiting"] == 2, 10, "two waiting requests")
        with pytest.raises(openai.RateLimitError) as exc:
            _long_chat(client, max_tokens=8)
        assert exc.value.status_code == 429
        assert exc.value.body["type"] == "rate_limit_error" and exc.value.code == "rate_limit_exceeded"
        assert exc.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError):
            _long_chat(client, stream=True)  # streams are refused before the response starts
    finally:
        for s in streams:
            s.close()
    _wait_for(lambda: _idle(server), 5, "all cancelled requests to leave")
    assert _long_chat(client, max_tokens=8).choices[0].finish_reason in ("stop", "length")


def test_request_timeout(server_factory) -> None:
    server = server_factory("--load-format", "dummy", "--request-timeout", "0.5")
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=60)
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as exc:
        _long_chat(client)
    assert exc.value.status_code == 504 and exc.value.code == "timeout"
    assert time.monotonic() - start < 5
    stream = _long_chat(client, stream=True)  # the response has started: the timeout is an SSE error event
    with pytest.raises(openai.APIError, match="did not finish within"):
        for _ in stream:
            pass
    _wait_for(lambda: _idle(server), 5, "timed-out requests to be cancelled")
    assert _finished(server, "timeout") >= 2
    short = _long_chat(client, max_tokens=8, extra_body={"block_length": 8})
    assert short.choices[0].finish_reason in ("stop", "length")
    server.stop()


def test_shutdown_drains_running_requests(server_factory) -> None:
    server = server_factory("--load-format", "dummy")
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120)
    result: dict = {}

    def run() -> None:
        try:
            result["resp"] = _long_chat(client, max_tokens=96)
        except Exception as exc:  # recorded for the assertion below
            result["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    _wait_for(lambda: server.health()["running"] == 1, 20, "the request to start")
    server.proc.send_signal(signal.SIGTERM)
    worker.join(120)
    assert "error" not in result, result.get("error")
    resp = result["resp"]
    assert resp.choices[0].finish_reason in ("stop", "length")
    if resp.choices[0].finish_reason == "length":
        assert resp.usage.completion_tokens == 96
    assert server.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean drain
    assert "draining 1 running requests" in server.log() and "drained: no request in flight" in server.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.base_url + "/health", timeout=2)
