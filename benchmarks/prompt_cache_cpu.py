"""Prompt-cache reuse on the CPU: a shared ~1,000-token system prompt, with and without reuse.

Starts `dllm-serve serve` twice on the same dummy-weights block-diffusion checkpoint (Nemotron
format, the bundled tokenizer, a 2,048-position context; written to a temporary directory), once
with the prompt cache (the default budget) and once with ``--prompt-cache-memory 0``, and sends
both the same streamed chat requests through the openai client: the shared system prompt plus a
different short user turn each. Two phases per arm, after one warm-up request (which also stores
the prefix in the cache arm):

- ``sequential``: one request at a time: time to first token (first content delta) and latency;
- ``concurrent``: ``--concurrency`` clients at once: wall time, requests/s and tokens/s.

Usage (results: benchmarks/prompt_cache_cpu.md, raw JSON: benchmarks/raw/prompt_cache_cpu.json):

    OMP_NUM_THREADS=1 python benchmarks/prompt_cache_cpu.py --json-out benchmarks/raw/prompt_cache_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-nemotron"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Network shape: wide enough that a 1,000-token prompt costs far more than one block step.
SHAPE = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 1536,
    "max_position_embeddings": 2048,
    "block_size": 32,
}


def write_checkpoint(directory: Path) -> Path:
    """tiny-nemotron's config.json with ``SHAPE`` and its tokenizer (weights: --load-format dummy)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = json.loads((TINY / "config.json").read_text())
    config.update(SHAPE)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy(TINY / name, directory / name)
    return directory


def system_prompt(model_dir: Path, tokens: int) -> tuple[str, int]:
    """A system message whose rendered chat turn is about ``tokens`` tokens long."""
    from dllm_serve.models.tokenizer import ChatTokenizer

    tok = ChatTokenizer(model_dir)
    rules, text = 0, ""
    while True:
        candidate = " ".join(f"Rule {i}: answer briefly and exactly." for i in range(rules + 1))
        n = len(tok.render_chat([{"role": "system", "content": candidate}]))
        if n > tokens:
            return text, len(tok.render_chat([{"role": "system", "content": text}]))
        rules, text = rules + 1, candidate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, threads: int, extra: list[str]) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="prompt-cache-bench-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "dllm_serve.cli", "serve", "--port", str(port), "--model-path"]
    cmd += [str(model_dir), "--load-format", "dummy", "--threads", str(threads), *extra]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError("server not ready")


def one_request(url: str, system: str, question: str, max_tokens: int, seed: int, steps: int) -> dict:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    start = time.perf_counter()
    first, usage = None, None
    stream = client.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=max_tokens,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
        # Dummy weights are never confident: bound the forwards per block as a trained model's
        # confidence does (tiny-nemotron commits ~16 tokens per forward at block 32).
        extra_body={"max_steps_per_block": steps},
    )
    for chunk in stream:
        usage = chunk.usage or usage
        if first is None and any(c.delta.content for c in chunk.choices):
            first = time.perf_counter()
    end = time.perf_counter()
    return {
        "ttft_s": None if first is None else first - start,
        "latency_s": end - start,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else 0,
    }


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("dllm_serve_prompt_cache_") and not line.split()[0].endswith("_created"):
            name, value = line.split()
            out[name] = float(value)
    return out


def run_arm(name: str, extra: list[str], args, model_dir: Path, system: str) -> dict:
    proc, url, log = start_server(model_dir, args.threads, extra)
    try:

        def ask(i: int) -> dict:
            question = f"Question {i}: copy the list a b c."
            return one_request(url, system, question, args.max_tokens, i, args.steps_per_block)

        warmup = ask(0)
        sequential = [ask(1 + i) for i in range(args.sequential)]
        start = time.perf_counter()
        base = 1 + args.sequential
        with ThreadPoolExecutor(args.concurrency) as pool:
            concurrent = list(pool.map(ask, range(base, base + args.concurrent_requests)))
        wall = time.perf_counter() - start
        tokens = sum(r["completion_tokens"] for r in concurrent)
        ttfts = [r["ttft_s"] for r in sequential if r["ttft_s"] is not None]
        summary = {
            "sequential_ttft_median_s": statistics.median(ttfts) if ttfts else None,
            "sequential_latency_median_s": statistics.median(r["latency_s"] for r in sequential),
            "concurrent_wall_s": wall,
            "concurrent_requests_per_s": len(concurrent) / wall,
            "concurrent_output_tokens_per_s": tokens / wall,
            "concurrent_ttft_median_s": statistics.median(
                [r["ttft_s"] for r in concurrent if r["ttft_s"] is not None] or [float("nan")]
            ),
        }
        return {
            "arm": name,
            "server_flags": extra,
            "warmup": warmup,
            "sequential": sequential,
            "concurrent": concurrent,
            "summary": summary,
            "metrics": metrics(url),
        }
    finally:
        proc.terminate()
        proc.wait(60)
        log.unlink(missing_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--steps-per-block", type=int, default=2, help="max_steps_per_block of each request")
    p.add_argument("--sequential", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--concurrent-requests", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_checkpoint(Path(tmp) / "m")
        system, system_tokens = system_prompt(model_dir, args.system_tokens)
        arms = [run_arm("reuse", [], args, model_dir, system)]
        arms.append(run_arm("no_reuse", ["--prompt-cache-memory", "0"], args, model_dir, system))
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
        },
        "model": {"format": "Nemotron (DiffEncoderModel), --load-format dummy", **SHAPE},
        "system_prompt_tokens": system_tokens,
        "settings": vars(args),
        "arms": arms,
    }
    text = json.dumps(report, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    for arm in arms:
        print(arm["arm"], json.dumps(arm["summary"]), json.dumps(arm["metrics"]))


if __name__ == "__main__":
    main()
