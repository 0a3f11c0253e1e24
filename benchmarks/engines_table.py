"""Render `dllm-serve eval --json` outputs as a markdown table, with ratios to `llada` at the same batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dllm_serve.engine.algorithms import PRESETS

ORDER = list(PRESETS)  # presets in the order algorithms.py defines them


def main(paths: list[str]) -> None:
    rows = [json.loads(Path(p).read_text()) for p in paths]
    rows.sort(key=lambda r: (r["batch_size"], ORDER.index(r["algorithm"]) if r["algorithm"] in ORDER else 99))
    ref = {r["batch_size"]: r for r in rows if r["algorithm"] == "llada"}
    print(
        "| batch | algorithm | accuracy % | forwards/token | tokens/forward | tokens/s | x llada tokens/s |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        base = ref.get(r["batch_size"])
        speedup = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        print(
            f"| {r['batch_size']} | {r['algorithm']} | {r['accuracy']:.1f} | {r['forwards_per_token']:.3f} | "
            f"{r['tokens_per_forward']:.2f} | {r['tokens_per_s']:.1f} | {speedup} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
