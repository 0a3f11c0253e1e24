"""Accuracy of each bundled model's default preset at every max_tokens a client may ask for.

A diffusion model decodes the whole ``max_tokens`` canvas, so a model trained on short canvases can
fail at long ones (the first tiny-llada answered nothing at 256). This runs the held-out prompts of a
suite at each canvas and writes one raw JSON (every `evaluate` report) plus a markdown table.

    OMP_NUM_THREADS=1 python benchmarks/canvas_accuracy.py --model models/tiny-llada \\
        --out benchmarks/raw/canvas_accuracy_tiny-llada.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from dllm_serve.commands import evaluate
from dllm_serve.config import EngineConfig
from dllm_serve.engine.engine import Engine
from dllm_serve.models.loader import load_model

MAX_TOKENS = (32, 64, 96, 128, 160, 192, 256, 384, 512)


def run(model: str, suite: str, limit: int, max_tokens: list[int], algorithm: str | None) -> dict:
    loaded = load_model(model)
    reports = []
    for n in max_tokens:
        engine = Engine(loaded, EngineConfig(max_batch_size=64))
        name = algorithm or engine.default_algorithm
        reports.append(evaluate(engine, name, limit, n, {}, suite))
        print(f"max_tokens {n:4d}: {reports[-1]['accuracy']:6.2f} %", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    return {
        "model": model,
        "suite": suite,
        "limit": limit,
        "commit": commit.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {platform.processor()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)",
        "reports": reports,
    }


def table(results: list[dict]) -> str:
    """One row per model (its default preset), one column per max_tokens."""
    cols = sorted({r["gen_length_asked"] for res in results for r in res["reports"]})
    lines = [
        "| model | preset | suite | " + " | ".join(str(c) for c in cols) + " |",
        "|---|---|---|" + "---:|" * len(cols),
    ]
    for res in results:
        by = {r["gen_length_asked"]: r for r in res["reports"]}
        algo = res["reports"][0]["algorithm"]
        cells = [f"{by[c]['accuracy']:.1f}" if c in by else "-" for c in cols]
        lines.append(f"| {Path(res['model']).name} | {algo} | {res['suite']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory")
    ap.add_argument("--suite", default="standard", choices=["standard", "dependent"])
    ap.add_argument("--limit", type=int, default=200, help="held-out prompts per canvas")
    ap.add_argument("--max-tokens", type=int, nargs="+", default=list(MAX_TOKENS))
    ap.add_argument("--algorithm", default=None, help="default: the model's default preset")
    ap.add_argument("--out", type=Path, help="raw JSON to write")
    ap.add_argument("--table", type=Path, nargs="+", help="print the table of these raw JSON files instead")
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(p.read_text()) for p in args.table]))
        return
    torch.set_num_threads(1)
    result = run(args.model, args.suite, args.limit, args.max_tokens, args.algorithm)
    for report, n in zip(result["reports"], args.max_tokens, strict=True):
        report["gen_length_asked"] = n
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(table([result]))


if __name__ == "__main__":
    main()
