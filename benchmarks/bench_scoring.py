"""Scored continuation tokens per second of POST /v1/loglikelihood on a real server.

Starts `dllm-serve serve` twice on loopback ports: with the defaults (scoring rows of concurrent
requests share forwards, up to --max-batch-size rows) and with --max-batch-size 1 (one sample per
forward: samples scored one after another). A fixed set of held-out examples of the bundled task
set is scored (context: the chat prompt; continuation: the answer, 12-20 tokens), one item per
HTTP request, ``--mc-num`` samples each, by ``c`` client threads; ``--answer-tokens 1`` scores
one-token answers (MMLU-style letters), whose samples are all the same mask and run as one row.
Runs alternate between the configurations, ``--repeats`` times; the JSON keeps every run, the
table quotes medians.

    python benchmarks/bench_scoring.py --model-path models/tiny-llada \
        --out benchmarks/raw/scoring_cpu_tiny-llada.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from dllm_serve.bench.tasks import heldout_examples
from dllm_serve.models.tokenizer import ChatTokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path: str, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [
        sys.executable,
        "-m",
        "dllm_serve.cli",
        "serve",
        "--model-path",
        model_path,
        "--port",
        str(port),
        *flags,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError("server did not start")


def run_load(url: str, items: list[dict], mc_num: int, concurrency: int) -> dict:
    client = httpx.Client(timeout=600)

    def one(item: dict) -> int:
        r = client.post(url + "/v1/loglikelihood", json={"requests": [item], "mc_num": mc_num, "seed": 0})
        r.raise_for_status()
        return r.json()["data"][0]["num_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, items))
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", default="models/tiny-llada")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--mc-num", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--answer-tokens", type=int, default=0, help="score only the answer's first N tokens (0: all of it)"
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    tok = ChatTokenizer(args.model_path)
    items = [
        {
            "context": tok.render_chat([{"role": "user", "content": ex.prompt}]),
            "continuation": tok.encode(ex.answer),
        }
        for ex in heldout_examples(args.requests)
    ]
    servers = {
        "batched": start_server(args.model_path),
        "one_row_per_forward": start_server(args.model_path, "--max-batch-size", "1"),
    }
    configs = [("batched", 1), ("batched", 16), ("one_row_per_forward", 16)]
    runs: dict[str, list[dict]] = {f"{name}_c{c}": [] for name, c in configs}
    try:
        for name, _ in configs:  # warm-up
            run_load(servers[name][1], items[:2], args.mc_num, 2)
        for _ in range(args.repeats):
            for name, c in configs:
                runs[f"{name}_c{c}"].append(run_load(servers[name][1], items, args.mc_num, c))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    medians = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "model": args.model_path,
        "requests": args.requests,
        "mc_num": args.mc_num,
        "answer_tokens": args.answer_tokens or "all",
        "repeats": args.repeats,
        "commit": commit,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_end": os.getloadavg(),
        "runs": runs,
        "median_tokens_per_s": medians,
        "ratio_c16_over_c1": medians["batched_c16"] / medians["batched_c1"],
        "ratio_batched_over_one_row_c16": medians["batched_c16"] / medians["one_row_per_forward_c16"],
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"| configuration | scored tokens/s (median of {args.repeats}) |")
    print("|---|---:|")
    for k, v in medians.items():
        print(f"| {k} | {v:.1f} |")
    print(f"c16 / c1: {result['ratio_c16_over_c1']:.2f}x")
    print(f"batched / one row per forward, c16: {result['ratio_batched_over_one_row_c16']:.2f}x")


if __name__ == "__main__":
    main()
