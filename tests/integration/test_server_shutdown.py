"""Bounded shutdown: SIGTERM with long requests in flight.

During the drain the listener stays open: /health answers 503 ``draining`` and new generation
requests get 503; after --drain-timeout the requests still running end with an OpenAI-shaped error
(a 503 body, or an SSE error event once a stream has started) and the process exits within a few
seconds more.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import openai

MODEL = "tiny-llada"
DRAIN_S = 3.0
# Far longer than the drain: 512 full-canvas forwards with a single running slot.
LONG = {"algorithm": "llada", "block_length": 32}


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120)


def test_sigterm_drains_then_ends_running_requests(server_factory) -> None:
    server = server_factory(
        "--load-format", "dummy", "--drain-timeout", str(DRAIN_S), "--max-batch-size", "1"
    )
    client = _client(server)
    outcome: dict[str, object] = {}

    def non_streaming() -> None:
        try:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=384, extra_body=LONG
            )
            outcome["plain"] = "finished"
        except openai.APIStatusError as exc:
            outcome["plain"] = exc

    def streaming() -> None:
        chunks = 0
        try:
            stream = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "y"}],
                max_tokens=384,
                extra_body=LONG,
                stream=True,
            )
            for _ in stream:
                chunks += 1
            outcome["stream"] = "finished"
        except openai.APIError as exc:
            outcome["stream"] = exc
        outcome["chunks"] = chunks

    workers = [threading.Thread(target=non_streaming), threading.Thread(target=streaming)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        h = server.health()
        if h["running"] + h["waiting"] == 2:
            break
        time.sleep(0.05)
    assert h["running"] == 1 and h["waiting"] == 1, h

    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    health = httpx.get(server.base_url + "/health", timeout=5)  # the listener is still open
    assert health.status_code == 503 and health.json()["status"] == "draining"
    refused = httpx.post(
        server.v1 + "/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "z"}], "max_tokens": 8},
        timeout=10,
    )
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "service_unavailable"

    for w in workers:
        w.join(60)
    code = server.proc.wait(30)
    took = time.monotonic() - signalled
    assert took < DRAIN_S + 8, took
    assert code in (0, -signal.SIGTERM)

    plain = outcome["plain"]
    assert isinstance(plain, openai.APIStatusError) and plain.status_code == 503, plain
    assert plain.code == "aborted" and "shutting down" in plain.message
    stream = outcome["stream"]
    assert isinstance(stream, openai.APIError) and "shutting down" in str(stream), stream
    log = server.log()
    assert "drain timeout" in log and "Traceback" not in log


def test_second_signal_skips_the_drain(server_factory) -> None:
    server = server_factory("--load-format", "dummy", "--drain-timeout", "120")
    client = _client(server)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=384, extra_body=LONG
            )
        except openai.APIStatusError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 30
    while server.health()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert server.health()["status"] == "draining"
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) in (0, -signal.SIGTERM)
    assert time.monotonic() - start < 10
    worker.join(30)
    assert isinstance(outcome.get("error"), openai.APIStatusError) and outcome["error"].code == "aborted"


def test_idle_server_exits_at_once(server_factory) -> None:
    server = server_factory("--load-format", "dummy")
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) in (0, -signal.SIGTERM)
    assert time.monotonic() - start < 5
