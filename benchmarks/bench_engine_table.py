"""Render `dllm-serve bench engine --json` reports as one markdown table (a row per report)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _kind(steps: dict, kind: str) -> str:
    s = steps[kind]
    if not s["steps"]:
        return "-"
    return f"{s['median_ms']:.1f} ms x{s['steps']}, {s['binding_limit']} {100 * s['fraction_of_limit']:.0f} %"


def _memory(totals: dict) -> str:
    value = totals.get("peak_gpu_allocated_bytes") or totals.get("peak_rss_bytes") or 0
    label = "GPU" if "peak_gpu_allocated_bytes" in totals else "RSS"
    return f"{value / 2**30:.2f} GiB {label}"


def main(paths: list[str]) -> None:
    print(
        "| model | preset | batch | prompt | gen | block | K | block steps (median, bound, % of bound) "
        "| refresh steps | tokens/s | tokens/forward | peak memory | raw |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---|")
    for path in paths:
        r = json.loads(Path(path).read_text())
        m, w, res = r["model"], r["workload"], r["results"]
        p, tot = res["params"], res["totals"]
        name = Path(m["path"]).name
        if m["config_overrides"]:
            name += " (" + ", ".join(f"{k}={v}" for k, v in m["config_overrides"].items()) + ")"
        preset = p["algorithm"] + (" + graphs" if w.get("cuda_graphs") else "")
        print(
            f"| {name} | {preset} | {w['batch_size']} | {w['prompt_len']} | {p['gen_length']} | "
            f"{p['block_length']} | {w['fixed_tokens_per_step'] or '-'} | {_kind(res['steps'], 'block')} | "
            f"{_kind(res['steps'], 'refresh')} | {tot['tokens_per_s']:.1f} | "
            f"{tot['tokens_per_forward']:.2f} | "
            f"{_memory(tot)} | [json](raw/{Path(path).name}) |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
