"""`dllm-serve bench`: ``serve`` puts a running server under load; ``engine`` times the engine offline.

``bench engine`` lives in ``dllm_serve.bench.engine_bench`` (its own ``register``); this module
only assembles the ``bench`` command and owns ``bench serve`` (``dllm_serve.bench.loadgen``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks: a running server under load, or the engine offline")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")

    s = bsub.add_parser(
        "serve",
        help="closed-loop load on an OpenAI-compatible server: req/s, tokens/s, TTFT, latency (JSON)",
    )
    s.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (with or without /v1)")
    s.add_argument("--concurrency", "-c", type=int, default=8, help="clients sending at once")
    s.add_argument("--requests", "-n", type=int, default=64, help="requests in total")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--model", default=None, help="model id (default: the server's first)")
    s.add_argument("--algorithm", default=None, help="decoding preset (default: the server's)")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0, help="request i uses seed + i")
    s.add_argument("--extra", default="{}", help="more request fields as JSON, e.g. '{\"block_length\": 8}'")
    s.add_argument("--api-key", default=None, help="Bearer key (default: $DLLM_SERVE_API_KEY)")
    s.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    s.add_argument("--json-out", "-o", default=None, help="also write the JSON report to this file")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=run_bench_serve)

    from dllm_serve.bench import engine_bench

    engine_bench.register(bsub)


def run_bench_serve(args: argparse.Namespace) -> int:
    from dllm_serve.bench.loadgen import LoadSettings, run_load

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise

    try:
        extra = json.loads(args.extra)
    except json.JSONDecodeError as exc:
        print(f"error: --extra is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(extra, dict) or args.concurrency < 1 or args.requests < 1:
        print("error: --extra must be a JSON object; --concurrency and --requests >= 1", file=sys.stderr)
        return 2
    settings = LoadSettings(
        url=args.url,
        concurrency=args.concurrency,
        requests=args.requests,
        max_tokens=args.max_tokens,
        model=args.model,
        algorithm=args.algorithm,
        temperature=args.temperature,
        seed=args.seed,
        extra=extra,
        api_key=args.api_key or os.environ.get("DLLM_SERVE_API_KEY"),
        timeout=args.timeout,
        progress=not args.quiet,
    )
    report = asyncio.run(run_load(settings))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text + "\n")
    return 0 if report["failed"] == 0 else 1
