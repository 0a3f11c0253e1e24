"""Evaluate a JSONL file of prompts against a running server, with concurrency and a progress bar.

Each input line is {"prompt": "...", "answer": "..."} (other keys are kept). Every prompt is sent as a
chat message; the reply is compared with `answer` after stripping white space. Results (the input
line plus `completion`, `correct` and the `diffusion` work figures) go to --output as JSONL; the
accuracy and mean tokens per forward are printed at the end.

    python examples/batch_eval.py examples/data/tasks.jsonl --output results.jsonl \
        --concurrency 8 --algorithm dual_cache --max-tokens 48
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import client, model_name
from tqdm import tqdm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=Path)
    ap.add_argument("--output", type=Path, default=Path("results.jsonl"))
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    ap.add_argument("--algorithm", default=None, help="decoding preset (default: the server's)")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()

    rows = [json.loads(line) for line in args.input.read_text().splitlines() if line.strip()]
    c = client()
    model = model_name(c)
    extra = {"algorithm": args.algorithm} if args.algorithm else {}

    def run(row: dict[str, Any]) -> dict[str, Any]:
        r = c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": row["prompt"]}],
            max_tokens=args.max_tokens,
            temperature=0,
            extra_body=extra,
        )
        text = r.choices[0].message.content or ""
        return {
            **row,
            "completion": text,
            "correct": text.strip() == row["answer"].strip(),
            "diffusion": r.model_extra.get("diffusion"),
        }

    # map() keeps the input order; the pool keeps `concurrency` requests in flight.
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(tqdm(pool.map(run, rows), total=len(rows), desc="requests", unit="req"))

    with args.output.open("w") as f:
        for res in results:
            f.write(json.dumps(res) + "\n")
    accuracy = 100.0 * sum(r["correct"] for r in results) / len(results)
    tpf = [r["diffusion"]["tokens_per_forward"] for r in results if r.get("diffusion")]
    print(
        f"accuracy {accuracy:.1f} % on {len(results)} prompts; "
        f"mean tokens per forward {sum(tpf) / max(1, len(tpf)):.2f}; results in {args.output}"
    )


if __name__ == "__main__":
    main()
