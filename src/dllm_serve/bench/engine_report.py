"""Report for `dllm-serve bench engine`: figures from a ``Measurement``, the JSON report, the table.

Each kind of step (block, refresh, all) is summarised: time percentiles, tokens per step, FLOPs and
bytes from the cost model, and the roofline bound those imply at the device's peak rates, which
says how far the step is from the limit that binds it.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dllm_serve.bench.engine_measure import BenchSettings, Measurement, StepRecord
    from dllm_serve.bench.hardware import ModelShape, PeakRates
    from dllm_serve.engine.engine import Engine


def results(m: Measurement, rates: PeakRates) -> dict[str, Any]:
    """The report's ``results``: per-kind step summaries, totals, the raw step times."""
    records = m.records
    wall = m.wall_s
    block = [r for r in records if r.kind == "block"]
    refresh = [r for r in records if r.kind == "refresh"]
    committed = sum(r.committed for r in records)
    forwards = sum(r.forwards for r in records)
    return {
        "params": m.params.to_dict(),
        "steps": {
            "block": summarise(block, rates),
            "refresh": summarise(refresh, rates),
            "all": summarise(records, rates),
        },
        "totals": {
            "wall_s": wall,
            "committed_tokens": committed,
            "tokens_per_s": committed / wall if wall else 0.0,
            "steps": len(records),
            "forwards": forwards,
            "refresh_forwards": sum(r.refresh_forwards for r in records),
            "model_calls": sum(r.model_calls for r in records),
            "tokens_per_forward": committed / forwards if forwards else 0.0,
            "finish_reasons": sorted({r.finish_reason for r in m.results.values()}),
            **m.peak_memory,
        },
        "step_seconds": [round(r.seconds, 6) for r in records],
        "step_kinds": [r.kind for r in records],
    }


def summarise(records: list[StepRecord], rates: PeakRates) -> dict[str, Any]:
    """One kind of step: timing, work, and the fraction of the roofline bound it reached."""
    from dllm_serve.bench.hardware import roofline_seconds

    if not records:
        return {"steps": 0}
    times = sorted(r.seconds for r in records)
    total = sum(times)
    flops = sum(r.cost.flops for r in records)
    nbytes = sum(r.cost.bytes for r in records)
    bound_s = compute_s = memory_s = 0.0
    for r in records:
        t, limit = roofline_seconds(r.cost, rates)
        bound_s += t
        if limit == "compute":
            compute_s += t
        else:
            memory_s += t
    n = len(records)
    return {
        "steps": n,
        "total_s": total,
        "mean_ms": 1e3 * total / n,
        "median_ms": 1e3 * statistics.median(times),
        "p90_ms": 1e3 * times[min(n - 1, int(0.9 * n))],
        "min_ms": 1e3 * times[0],
        "runner_mean_ms": 1e3 * sum(r.runner_seconds for r in records) / n,
        "forwards": sum(r.forwards for r in records),
        "model_calls": sum(r.model_calls for r in records),
        "committed_tokens": sum(r.committed for r in records),
        "tokens_per_step": sum(r.committed for r in records) / n,
        "flops": flops,
        "bytes": nbytes,
        "weight_bytes": sum(r.cost.weight_bytes for r in records),
        "kv_bytes": sum(r.cost.kv_bytes for r in records),
        "flops_per_s": flops / total if total else 0.0,
        "bytes_per_s": nbytes / total if total else 0.0,
        "binding_limit": "compute" if compute_s >= memory_s else "memory",
        "roofline_s": bound_s,
        "fraction_of_limit": bound_s / total if total else 0.0,
    }


def build_report(
    *,
    model_path: str,
    load_format: str,
    config_overrides: dict[str, Any],
    engine: Engine,
    settings: BenchSettings,
    cuda_graphs: bool,
    rates: PeakRates,
    shape: ModelShape,
    results: dict[str, Any],
) -> dict[str, Any]:
    """The JSON report: what ran (command, commit, machine, model, workload), the device's peak
    rates, the KV cache, and ``results``."""
    import torch

    model = engine.runner.model
    param = next(model.parameters())
    return {
        "benchmark": "engine",
        "command": _command_line(),
        "commit": _git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "device": rates.device,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda,
        },
        "model": {
            "path": model_path,
            "family": engine.loaded.family,
            "dtype": str(param.dtype).removeprefix("torch."),
            "load_format": load_format,
            "config_overrides": config_overrides,
            "shape": shape.to_dict(),
            "mask_token_id": model.roles.mask_token_id,
        },
        "workload": {
            "batch_size": settings.batch_size,
            "prompt_len": settings.prompt_len,
            "gen_length": settings.gen_length,
            "fixed_tokens_per_step": settings.fixed_tokens_per_step,
            "warmup_steps": settings.warmup_steps,
            "seed": settings.seed,
            "cuda_graphs": cuda_graphs,
        },
        "hardware": rates.to_dict(),
        "kv_cache": {
            "bytes_per_token": engine.runner.pool.bytes_per_token,
            "budget_bytes": engine.runner.kv_plan.budget_bytes,
            "budget_source": engine.runner.kv_plan.source,
            "tokens_that_fit": engine.runner.pool.capacity,
            "peak_used_tokens": engine.runner.pool.peak_used,
        },
        "results": results,
    }


def _git_commit() -> str | None:
    """The checkout's short commit, with ``-dirty`` when tracked files differ from it."""
    repo = Path(__file__).resolve().parents[3]

    def git(*args: str) -> str:
        cmd = ["git", "-C", str(repo), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def _command_line() -> str | None:
    """The exact command, when run as the ``dllm-serve`` program (not from tests or Python)."""
    if Path(sys.argv[0]).name != "dllm-serve":
        return None
    return " ".join(["dllm-serve", *sys.argv[1:]])


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_table(report: dict[str, Any]) -> str:
    """The human-readable summary printed by the CLI."""
    m, w, hw, res = report["model"], report["workload"], report["hardware"], report["results"]
    tot = res["totals"]
    fixed = w["fixed_tokens_per_step"]
    p = res["params"]
    lines = [
        f"model    {m['path']} ({m['family']}, {m['dtype']}, {m['load_format']} weights, "
        f"{m['shape']['streamed_params'] / 1e6:.1f}M streamed params)",
        f"device   {hw['device']}",
        f"peaks    {_si(hw['matmul_flops_per_s'], 'FLOP/s')} matmul, "
        f"{_si(hw['read_bytes_per_s'], 'B/s')} read ({hw['source']}, {hw['dtype']})",
        f"workload {p['algorithm']}, batch {w['batch_size']}, prompt {w['prompt_len']}, "
        f"generate {p['gen_length']}, block {p['block_length']}, rule {p['rule']} ({p['steps']} steps)"
        + (f", fixed {fixed} tokens/step" if fixed else "")
        + (", CUDA graphs" if w.get("cuda_graphs") else ""),
        "",
        "| step kind | steps | mean ms | median ms | p90 ms | tokens/step | FLOP/step | bytes/step "
        "| bound | % of bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for kind in ("block", "refresh", "all"):
        s = res["steps"][kind]
        if not s["steps"]:
            continue
        n = s["steps"]
        lines.append(
            f"| {kind} | {n} | {s['mean_ms']:.2f} | {s['median_ms']:.2f} | {s['p90_ms']:.2f} | "
            f"{s['tokens_per_step']:.1f} | {_si(s['flops'] / n, '')} | {_si(s['bytes'] / n, 'B')} | "
            f"{s['binding_limit']} | {100 * s['fraction_of_limit']:.1f} |"
        )
    memory = (
        f"peak GPU memory {_si(tot['peak_gpu_allocated_bytes'], 'B')} allocated"
        if "peak_gpu_allocated_bytes" in tot
        else f"peak RSS {_si(tot['peak_rss_bytes'], 'B')}"
    )
    lines += [
        "",
        f"{tot['committed_tokens']} tokens in {tot['wall_s']:.3f} s = {tot['tokens_per_s']:.1f} tokens/s; "
        f"{tot['forwards']} forwards ({tot['refresh_forwards']} refresh, {tot['model_calls']} model calls), "
        f"{tot['tokens_per_forward']:.2f} tokens/forward; {memory}",
    ]
    kv = report.get("kv_cache")
    if kv:
        from dllm_serve.engine.memory import human_bytes

        lines.append(
            f"KV cache {kv['bytes_per_token']} B/token, {kv['tokens_that_fit']} tokens fit "
            f"({human_bytes(kv['budget_bytes'])}: {kv['budget_source']}); the run held at most "
            f"{kv['peak_used_tokens']} tokens"
        )
    return "\n".join(lines)
