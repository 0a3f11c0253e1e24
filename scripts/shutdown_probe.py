"""Measure SIGTERM with long requests in flight: time to exit, what /health said, how requests ended.

Starts ``dllm-serve serve`` (tiny-llada, dummy weights, one running slot, plus any flags after
``--``), sends two long ``llada`` chat requests (384 full-canvas forwards each; one plain, one
streamed), sends SIGTERM three seconds later, polls ``/health`` every second until the process exits,
and prints JSON: seconds from SIGTERM to exit, the exit status, the /health answers seen, and each
request's status and the tail of its body.

    python scripts/shutdown_probe.py
    python scripts/shutdown_probe.py -- --drain-timeout 10
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time

import httpx

from probe_server import start_dummy_server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("serve_args", nargs="*", help="extra `serve` flags (after --)")
    args = parser.parse_args()
    proc, base = start_dummy_server(["--max-batch-size", "1", *args.serve_args])
    results: dict[str, object] = {}

    def send(name: str, stream: bool) -> None:
        body = {
            "model": "tiny-llada",
            "messages": [{"role": "user", "content": name}],
            "max_tokens": 384,
            "algorithm": "llada",
            "block_length": 32,
            "stream": stream,
        }
        start = time.monotonic()
        try:
            with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
                data = r.read()
            results[name] = [
                r.status_code,
                data[-160:].decode(errors="replace"),
                round(time.monotonic() - start, 1),
            ]
        except httpx.HTTPError as exc:
            results[name] = [type(exc).__name__, str(exc)[:100], round(time.monotonic() - start, 1)]

    senders = [
        threading.Thread(target=send, args=("plain", False)),
        threading.Thread(target=send, args=("stream", True)),
    ]
    for t in senders:
        t.start()
    time.sleep(3)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    seen: list[tuple[float, str]] = []
    while proc.poll() is None:
        try:
            answer = httpx.get(base + "/health", timeout=2).json()["status"]
        except httpx.HTTPError as exc:
            answer = type(exc).__name__
        seen.append((round(time.monotonic() - signalled, 1), answer))
        time.sleep(1)
    exited = round(time.monotonic() - signalled, 1)
    for t in senders:
        t.join()
    report = {
        "exit_after_sigterm_s": exited,
        "returncode": proc.returncode,
        "health_answers": sorted({a for _, a in seen}),
        "first_health": seen[:2],
        "requests": results,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
