"""Accuracy against tokens per forward on the `dependent` suite, for every preset and commit rule.

On the `dependent` suite (docs/tasks.md) every answer letter is lower or upper case with confidence
1/2 until one is committed, so a rule that commits several uncertain positions in one forward mixes
the cases. Each point is one `evaluate` run (held-out prompts, greedy, 32-token canvas = one block):

- every preset at thresholds THRESHOLDS (threshold presets use the threshold rule, dinfer_hierarchy
  its hierarchy rule, dinfer_credit its credit rule, llada's full canvas switches to the threshold rule);
- every threshold preset with Fast-dLLM's factor rule at FACTORS;
- `llada`'s own fixed schedule at 1, 2, 4 and 8 tokens per step.

Writes the raw JSON (every report), a markdown table and an SVG plot (one panel per preset, one
curve per rule); no plotting library is needed.

    OMP_NUM_THREADS=1 python benchmarks/dependent_tradeoff.py            # both bundled models
    python benchmarks/dependent_tradeoff.py --plot-only                  # redraw from the raw JSON
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
from dllm_serve.engine.algorithms import presets_for
from dllm_serve.engine.engine import Engine
from dllm_serve.models.loader import load_model

HERE = Path(__file__).parent
RAW = HERE / "raw" / "dependent_tradeoff_cpu.json"
SVG = HERE / "dependent_tradeoff_cpu.svg"
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
FACTORS = (0.5, 1.0, 2.0, 4.0, 8.0)
TOKENS_PER_STEP = (1, 2, 4, 8)
GEN_LENGTH = 32
MODELS = {"llada": "models/tiny-llada", "nemotron": "models/tiny-nemotron"}


def points(family: str) -> list[tuple[str, str, dict]]:
    """(preset, curve label, overrides) for every point of a family."""
    out = []
    for preset in presets_for(family):
        rule = preset.rule if preset.rule != "schedule" else "threshold"
        out += [(preset.name, rule, {"threshold": t}) for t in THRESHOLDS]
        if preset.rule in ("threshold", "schedule"):
            out += [(preset.name, "factor", {"factor": f}) for f in FACTORS]
        if preset.rule == "schedule":
            out += [(preset.name, "schedule", {"steps": GEN_LENGTH // k}) for k in TOKENS_PER_STEP]
    return out


def measure(limit: int) -> dict:
    runs = []
    for family, path in MODELS.items():
        loaded = load_model(path)
        for preset, curve, overrides in points(family):
            engine = Engine(loaded, EngineConfig(max_batch_size=64))
            report = evaluate(engine, preset, limit, GEN_LENGTH, overrides, "dependent")
            runs.append(
                {"model": Path(path).name, "preset": preset, "curve": curve, "set": overrides, **report}
            )
            print(
                f"{Path(path).name:14s} {preset:16s} {curve:9s} {overrides}: {report['accuracy']:5.1f} % "
                f"{report['tokens_per_forward']:5.2f} tok/fwd {report['accuracy_by_task']}",
                flush=True,
            )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    return {
        "suite": "dependent",
        "limit": limit,
        "gen_length": GEN_LENGTH,
        "commit": commit.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        "runs": runs,
    }


def table(data: dict) -> str:
    lines = [
        "| model | preset | rule | setting | accuracy % | tokens/forward |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in data["runs"]:
        (key, value) = next(iter(r["set"].items()))
        lines.append(
            f"| {r['model']} | {r['preset']} | {r['curve']} | {key} {value} | {r['accuracy']:.1f} | "
            f"{r['tokens_per_forward']:.2f} |"
        )
    return "\n".join(lines)


COLORS = {
    "threshold": "#1f77b4",
    "factor": "#d62728",
    "hierarchy": "#2ca02c",
    "credit": "#9467bd",
    "schedule": "#7f7f7f",
}


def svg(data: dict) -> str:
    """Small multiples: one panel per (model, preset); x tokens per forward, y accuracy."""
    panels: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in data["runs"]:
        panels.setdefault((r["model"], r["preset"]), {}).setdefault(r["curve"], []).append(r)
    xmax = max(r["tokens_per_forward"] for r in data["runs"]) * 1.05
    cols, pw, ph, pad = 4, 260, 200, 45
    rows = -(-len(panels) // cols)
    width, height = cols * pw + 20, rows * ph + 60
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="18" font-size="13">dependent suite: accuracy % (y) vs tokens per forward (x), '
        f"{data['limit']} prompts/point, canvas {data['gen_length']}; labels: threshold / factor / "
        f"tokens per step</text>",
    ]
    for i, name in enumerate(COLORS):
        out.append(f'<rect x="{10 + i * 90}" y="28" width="10" height="10" fill="{COLORS[name]}"/>')
        out.append(f'<text x="{24 + i * 90}" y="37">{name}</text>')
    for n, ((model, preset), curves) in enumerate(sorted(panels.items())):
        x0, y0 = 20 + (n % cols) * pw, 50 + (n // cols) * ph
        iw, ih = pw - pad - 10, ph - pad - 10

        def sx(v: float, x0=x0, iw=iw) -> float:
            return x0 + pad + v / xmax * iw

        def sy(v: float, y0=y0, ih=ih) -> float:
            return y0 + 10 + (100 - v) / 100 * ih

        out.append(f'<text x="{x0 + pad}" y="{y0 + 6}" font-weight="bold">{model} / {preset}</text>')
        out.append(
            f'<rect x="{x0 + pad}" y="{y0 + 10}" width="{iw}" height="{ih}" fill="none" stroke="#999"/>'
        )
        for v in (0, 50, 100):
            out.append(f'<text x="{x0 + pad - 4}" y="{sy(v) + 4}" text-anchor="end">{v}</text>')
        for v in range(0, int(xmax) + 1, max(1, int(xmax) // 4)):
            out.append(f'<text x="{sx(v)}" y="{y0 + ih + 24}" text-anchor="middle">{v}</text>')
        for curve, runs in curves.items():
            runs = sorted(runs, key=lambda r: r["tokens_per_forward"])
            pts = " ".join(f"{sx(r['tokens_per_forward']):.1f},{sy(r['accuracy']):.1f}" for r in runs)
            color = COLORS[curve]
            out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"/>')
            for r in runs:
                cx, cy = sx(r["tokens_per_forward"]), sy(r["accuracy"])
                label = next(iter(r["set"].values()))
                if curve == "schedule":
                    label = data["gen_length"] // label
                out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2.5" fill="{color}"/>')
                out.append(
                    f'<text x="{cx + 3:.1f}" y="{cy - 3:.1f}" font-size="8" fill="{color}">{label}</text>'
                )
    out.append("</svg>")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=99, help="held-out prompts per point (33 per task)")
    ap.add_argument("--plot-only", action="store_true", help="redraw table and plot from the raw JSON")
    args = ap.parse_args()
    if args.plot_only:
        data = json.loads(RAW.read_text())
    else:
        torch.set_num_threads(1)
        data = measure(args.limit)
        RAW.parent.mkdir(parents=True, exist_ok=True)
        RAW.write_text(json.dumps(data, indent=1))
    SVG.write_text(svg(data))
    print(table(data))


if __name__ == "__main__":
    main()
