"""Measure what one large chat request costs a running server: /health latency and the server's RSS.

Starts ``dllm-serve serve`` (tiny-llada, dummy weights, or any flags after ``--``) on a free port,
records its resident memory (``VmRSS`` from ``/proc/PID/status``: Linux only) once it is ready,
sends one ``/v1/chat/completions`` request whose body is ``--mb`` megabytes of plain ASCII text while
a second thread polls ``/health`` every 20 ms, then reports the request's status and time, the
/health latencies seen meanwhile (max, p50), and RSS at baseline, at its peak during the request and
2 s after it (after a warm-up request of the same size, so one-time allocations are in the baseline).

    python scripts/request_size_probe.py --mb 10
    python scripts/request_size_probe.py --mb 2 -- --max-request-bytes 4194304
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import threading
import time

import httpx

from probe_server import start_dummy_server


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def big_chat(megabytes: float) -> bytes:
    text = ("lorem ipsum dolor sit amet " * (int(megabytes * 1e6) // 27 + 1))[: int(megabytes * 1e6)]
    body = {"model": "tiny-llada", "messages": [{"role": "user", "content": text}], "max_tokens": 8}
    return json.dumps(body).encode()


def one_request(base: str, pid: int, body: bytes) -> dict:
    latencies: list[float] = []
    peak = [rss_mib(pid)]
    done = threading.Event()

    def poll() -> None:  # one kept-alive connection: a new httpx client costs ~100 ms by itself
        with httpx.Client(base_url=base, timeout=120) as client:
            while not done.is_set():
                start = time.perf_counter()
                client.get("/health")
                latencies.append(time.perf_counter() - start)
                peak[0] = max(peak[0], rss_mib(pid))
                time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    start = time.perf_counter()
    resp = httpx.post(
        base + "/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=600,
    )
    elapsed = time.perf_counter() - start
    done.set()
    poller.join()
    time.sleep(2.0)
    return {
        "status": resp.status_code,
        "error_code": resp.json().get("error", {}).get("code") if resp.status_code != 200 else None,
        "request_s": round(elapsed, 3),
        "health_max_ms": round(max(latencies) * 1000, 1),
        "health_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "health_polls": len(latencies),
        "rss_peak_mib": round(peak[0], 1),
        "rss_after_mib": round(rss_mib(pid), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=10.0, help="request body size in megabytes")
    parser.add_argument("serve_args", nargs="*", help="extra `serve` flags (after --)")
    args = parser.parse_args()
    proc, base = start_dummy_server(args.serve_args)
    try:
        body = big_chat(args.mb)
        small = json.dumps(
            {"model": "tiny-llada", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        ).encode()
        httpx.post(base + "/v1/chat/completions", content=small, headers={"content-type": "application/json"})
        time.sleep(1.0)
        baseline = rss_mib(proc.pid)
        warmup = one_request(base, proc.pid, body)
        measured = one_request(base, proc.pid, body)
        report = {
            "body_bytes": len(body),
            "rss_baseline_mib": round(baseline, 1),
            "warmup": warmup,
            "measured": measured,
            "rss_after_vs_baseline": round(measured["rss_after_mib"] / baseline - 1, 3),
        }
        print(json.dumps(report, indent=2))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
