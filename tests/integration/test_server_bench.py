"""`dllm-serve bench serve` against a real server: the JSON report adds up."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

from dllm_serve.bench.loadgen import api_base, percentile


def test_percentile_and_url() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == 9.9
    assert api_base("http://h:1") == api_base("http://h:1/") == api_base("http://h:1/v1") == "http://h:1/v1"


def test_bench_serve_report(server_factory, tmp_path) -> None:
    server = server_factory("--load-format", "dummy")
    out = tmp_path / "report.json"
    cmd = [
        sys.executable, "-m", "dllm_serve.cli", "bench", "serve", "--url", server.base_url,
        "--concurrency", "4", "--requests", "8", "--max-tokens", "16",
        "--extra", '{"block_length": 8}', "--quiet", "--json-out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report == json.loads(proc.stdout)
    assert report["model"] == "tiny-llada" and report["completed"] == 8 and report["failed"] == 0
    assert 0 < report["output_tokens"] <= 8 * 16
    assert report["requests_per_s"] > 0 and report["output_tokens_per_s"] > 0
    assert report["forwards"] >= report["output_tokens"] / 8  # at most a block per forward
    for key in ("ttft_s", "latency_s"):
        s = report[key]
        assert 0 < s["p50"] <= s["p99"] <= s["max"]
    assert report["ttft_s"]["p50"] <= report["latency_s"]["p50"]
    metrics = httpx.get(server.base_url + "/metrics").text
    finished = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("dllm_serve_requests_finished_total{")
    ]
    assert sum(finished) == 8
