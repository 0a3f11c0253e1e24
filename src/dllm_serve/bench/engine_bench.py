"""`dllm-serve bench engine`: time the engine itself, offline, on a checkpoint or a bare config.

One wave of ``batch`` requests with random prompt ids runs through the real engine loop (scheduler,
runner, decoding). Every iteration is timed between device synchronisations and classed as a
*block step* (cached or full-canvas forwards only) or a *refresh step* (at least one forward
rebuilds the KV cache). Each model call's FLOPs and bytes are computed from the config and the
call's shapes, and divided by peak rates measured on the device, which says how far each kind of
step is from the limit that binds it.

``--fixed-tokens-per-step K`` switches decoding to the fixed schedule with exactly K commits per
step and no early stop, so timings do not depend on the weights (dummy weights commit the same
number of tokens as trained ones). Prompts are random token ids and nothing is detokenized, so a
config directory with ``--load-format dummy`` is enough (see ``dllm_serve/models/configs``).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dllm_serve.bench.hardware import ForwardCost, PeakRates
    from dllm_serve.engine.engine import Engine

log = logging.getLogger(__name__)

SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "models" / "configs"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class BenchError(ValueError):
    """A benchmark setting that cannot run; the CLI prints it and exits with status 2."""


@dataclass
class BenchSettings:
    batch_size: int = 1
    prompt_len: int = 64
    gen_length: int = 256
    block_length: int | None = None  # None: the preset's default
    fixed_tokens_per_step: int | None = None
    algorithm: str | None = None  # None: the engine's default preset
    overrides: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 2
    seed: int = 0
    progress: bool = True


# -- setup ----------------------------------------------------------------------------------------


def fixed_step_overrides(gen_length: int, block_length: int, tokens_per_step: int) -> dict[str, Any]:
    """Decoding overrides under which every step commits exactly ``tokens_per_step`` per sequence.

    The fixed schedule with steps = gen_length / K commits ceil(masked / steps left) = K tokens
    at every step when K divides the block length; early stop is off so the whole canvas runs.
    """
    k = tokens_per_step
    if k < 1:
        raise BenchError(f"--fixed-tokens-per-step must be >= 1, got {k}")
    if block_length % k:
        raise BenchError(f"--fixed-tokens-per-step ({k}) must divide the block length ({block_length})")
    if gen_length % block_length:
        raise BenchError(
            f"--gen-length ({gen_length}) must be a multiple of the block length ({block_length}) "
            "with --fixed-tokens-per-step"
        )
    return {"rule": "schedule", "steps": gen_length // k, "block_length": block_length, "early_stop": False}


def resolve_model_dir(path: str) -> str:
    """A directory as given, else a config shipped with dllm-serve (``llada-8b-instruct``, ...)."""
    if Path(path).expanduser().is_dir():
        return path
    shipped = SHIPPED_CONFIGS / path
    if shipped.is_dir():
        return str(shipped)
    return path


def shipped_config_names() -> list[str]:
    return sorted(p.name for p in SHIPPED_CONFIGS.iterdir() if (p / "config.json").is_file())


def parse_config_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are JSON when they parse (numbers, booleans), else strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise BenchError(f"--config-override expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def patched_model_dir(source: Path, overrides: dict[str, Any], into: Path) -> Path:
    """A copy of a model directory's small files (never its weights) with config.json overridden."""
    into.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name != "config.json":
            shutil.copy(item, into / item.name)
    config = json.loads((source / "config.json").read_text())
    config.update(overrides)
    (into / "config.json").write_text(json.dumps(config, indent=2))
    return into


def check_family_available(model_dir: Path) -> None:
    """A clear error when the checkpoint's architecture has no native model in this build."""
    from dllm_serve.models.loader import detect_family

    family = detect_family(json.loads((model_dir / "config.json").read_text()))
    if family == "nemotron":
        try:
            import dllm_serve.models.nemotron  # noqa: F401
        except ImportError as exc:
            raise BenchError(
                "this is a Nemotron-Diffusion config, but the native Nemotron model "
                "(dllm_serve.models.nemotron) is not available in this build"
            ) from exc


def batch_kv_bytes(model_dir: Path, batch: int, canvas: int, dtype: str) -> int:
    """KV memory of ``batch`` sequences of ``canvas`` tokens: the benchmark's default budget, so that
    its peak-memory figure is weights + activations + the batch's cache, not the whole device."""
    import torch

    from dllm_serve.bench.hardware import shape_from_config
    from dllm_serve.engine.kv_cache import extent_tokens, kv_bytes_per_token

    shape = shape_from_config(json.loads((model_dir / "config.json").read_text()))
    per_token = kv_bytes_per_token(shape.n_layers, shape.n_kv_heads, shape.head_dim, getattr(torch, dtype))
    return batch * extent_tokens(canvas) * per_token


def random_prompts(n: int, length: int, vocab: int, avoid: set[int], seed: int) -> list[list[int]]:
    """Random prompt ids that avoid special tokens (mask, stops): no prompt can end a request."""
    rng = random.Random(seed)
    allowed = [t for t in range(vocab) if t not in avoid] if vocab < 1_000_000 else None
    if not allowed:
        raise BenchError("the vocabulary has no ordinary tokens to build prompts from")
    return [[rng.choice(allowed) for _ in range(length)] for _ in range(n)]


# -- measurement ----------------------------------------------------------------------------------


@dataclass
class StepRecord:
    kind: str  # "block" | "refresh"
    seconds: float
    runner_seconds: float
    forwards: int
    refresh_forwards: int
    model_calls: int
    committed: int
    cost: ForwardCost


def _summarise(records: list[StepRecord], rates: PeakRates) -> dict[str, Any]:
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


def _peak_memory(device: Any) -> dict[str, Any]:
    import torch

    if device.type == "cuda":
        return {
            "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(device),
        }
    # Linux reports ru_maxrss in KiB: the process's resident peak, weights included.
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_engine_bench(engine: Engine, settings: BenchSettings, rates: PeakRates) -> dict[str, Any]:
    """Warm up, then run one timed wave of ``batch_size`` requests; per-step records and a summary."""
    import torch

    from dllm_serve.bench.hardware import ForwardRecorder, shape_from_config, synchronize
    from dllm_serve.engine.algorithms import ParamError
    from dllm_serve.engine.kv_cache import extent_tokens
    from dllm_serve.engine.sequence import GenerationRequest

    loaded = engine.loaded
    model = loaded.model
    overrides = dict(settings.overrides)
    if settings.block_length is not None:
        overrides["block_length"] = settings.block_length
    overrides.setdefault("seed", settings.seed)
    try:
        if settings.fixed_tokens_per_step is not None:
            block = engine.resolve_params(settings.gen_length, overrides, settings.algorithm).block_length
            overrides.update(fixed_step_overrides(settings.gen_length, block, settings.fixed_tokens_per_step))
        params = engine.resolve_params(settings.gen_length, overrides, settings.algorithm)
    except ParamError as exc:
        raise BenchError(f"{exc.param}: {exc}") from exc
    pool = engine.runner.pool
    need = settings.batch_size * extent_tokens(settings.prompt_len + params.gen_length)
    if params.cache != "none" and need > pool.capacity:
        raise BenchError(
            f"the KV cache holds {pool.capacity} tokens, the batch needs {need}: the wave would not run "
            "as one batch; raise --kv-cache-memory (or --gpu-memory-utilization)"
        )

    roles = model.roles
    avoid = {roles.mask_token_id, roles.eos_token_id, roles.pad_token_id, *roles.stop_token_ids}
    avoid.update(loaded.tokenizer.hf.all_special_ids)
    prompts = random_prompts(settings.batch_size, settings.prompt_len, model.vocab_size, avoid, settings.seed)

    def wave(tag: str) -> list[GenerationRequest]:
        n = settings.gen_length
        return [GenerationRequest(f"{tag}-{i}", list(p), params, n) for i, p in enumerate(prompts)]

    device = next(model.parameters()).device
    shape = shape_from_config(loaded.config)
    recorder = ForwardRecorder(engine.runner, shape)
    infos: list = []
    engine.step_observers.append(infos.append)
    try:
        if settings.warmup_steps > 0:
            _warm_up(engine, wave("warmup"), settings.warmup_steps)
        recorder.take()
        infos.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        records, wall, results = _timed_wave(engine, wave("bench"), recorder, infos, device, settings)
    finally:
        engine.step_observers.remove(infos.append)
        recorder.close()
    synchronize(device)

    errors = [r.error for r in results.values() if r.error]
    if errors:
        raise BenchError(f"{len(errors)} request(s) failed: {errors[0]}")
    block = [r for r in records if r.kind == "block"]
    refresh = [r for r in records if r.kind == "refresh"]
    committed = sum(r.committed for r in records)
    forwards = sum(r.forwards for r in records)
    return {
        "params": params.to_dict(),
        "steps": {
            "block": _summarise(block, rates),
            "refresh": _summarise(refresh, rates),
            "all": _summarise(records, rates),
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
            "finish_reasons": sorted({r.finish_reason for r in results.values()}),
            **_peak_memory(device),
        },
        "step_seconds": [round(r.seconds, 6) for r in records],
        "step_kinds": [r.kind for r in records],
    }


def _warm_up(engine: Engine, requests: list, steps: int) -> None:
    """First calls pay for allocation and kernel selection; run a few steps, then cancel them."""
    for req in requests:
        engine.scheduler.submit(req, lambda event: None, ignore_queue_limit=True)
    for _ in range(steps):
        if not engine.step():
            break
    for req in requests:
        engine.abort(req.request_id)
    while engine.step():
        pass


def _timed_wave(
    engine: Engine, requests: list, recorder: Any, infos: list, device: Any, settings: BenchSettings
) -> tuple[list[StepRecord], float, dict]:
    from tqdm import tqdm

    from dllm_serve.bench.hardware import synchronize
    from dllm_serve.engine.engine import RequestResult

    results: dict[str, RequestResult] = {}

    def collect(event) -> None:
        res = results.setdefault(event.request_id, RequestResult([], "", False, 0))
        res.token_ids.extend(event.token_ids)
        if event.finished:
            res.finish_reason = event.finish_reason or ""
            res.error = event.error

    total_tokens = settings.batch_size * requests[0].params.gen_length
    records: list[StepRecord] = []
    bar = tqdm(
        total=total_tokens,
        unit="tok",
        desc="bench engine",
        disable=not settings.progress,
        file=sys.stderr,
        leave=False,
    )
    synchronize(device)
    start = time.perf_counter()
    for req in requests:
        engine.scheduler.submit(req, collect, ignore_queue_limit=True)
    while True:
        t0 = time.perf_counter()
        worked = engine.step()
        synchronize(device)
        elapsed = time.perf_counter() - t0
        if not worked:
            break
        info = infos.pop()
        cost, calls = recorder.take()
        kind = "refresh" if info.refresh_forwards else "block"
        records.append(
            StepRecord(
                kind,
                elapsed,
                info.duration_s,
                info.forwards,
                info.refresh_forwards,
                calls,
                info.committed_tokens,
                cost,
            )
        )
        bar.update(info.committed_tokens)
    wall = time.perf_counter() - start
    bar.close()
    return records, wall, results


# -- report ---------------------------------------------------------------------------------------


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


def bench_engine(args: argparse.Namespace) -> dict[str, Any]:
    """Build the engine from the CLI flags, measure peak rates, run the benchmark; the JSON report."""
    import torch

    from dllm_serve.bench.hardware import PeakRates, device_name, measure_peak_rates, shape_from_config
    from dllm_serve.config import engine_config_from_args
    from dllm_serve.engine.engine import build_engine

    settings = BenchSettings(
        batch_size=args.max_batch_size,
        prompt_len=args.prompt_len,
        gen_length=args.gen_length,
        block_length=args.block_length,
        fixed_tokens_per_step=args.fixed_tokens_per_step,
        algorithm=args.algorithm,
        overrides=_decoding_overrides(args),
        warmup_steps=args.bench_warmup,
        seed=args.seed if args.seed is not None else 0,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    if settings.batch_size < 1 or settings.prompt_len < 1 or settings.gen_length < 1:
        raise BenchError("--batch-size, --prompt-len and --gen-length must be >= 1")
    config_overrides = parse_config_overrides(args.config_override)
    model_dir = Path(resolve_model_dir(args.model_path))
    if not (model_dir / "config.json").is_file():
        names = ", ".join(shipped_config_names())
        raise BenchError(f"{args.model_path} is not a model directory or a shipped config ({names})")
    has_weights = any(model_dir.glob("*.safetensors"))
    if args.load_format != "dummy" and (config_overrides or not has_weights):
        why = "--config-override changes the shapes" if config_overrides else f"{model_dir} has no weights"
        raise BenchError(f"{why}: pass --load-format dummy (random weights built from the config)")
    check_family_available(model_dir)
    if args.trust_remote_code:
        raise BenchError("bench engine measures the native engine; --trust-remote-code is not supported")

    with tempfile.TemporaryDirectory(prefix="dllm-bench-") as tmp:
        if config_overrides:
            model_dir = patched_model_dir(model_dir, config_overrides, Path(tmp) / "model")
        base = engine_config_from_args(args)
        canvas = settings.prompt_len + settings.gen_length + (settings.block_length or 0)
        kv_memory = base.kv_cache_memory or str(
            batch_kv_bytes(model_dir, settings.batch_size, canvas, base.resolved_dtype())
        )
        config = replace(
            base,
            model_path=str(model_dir),
            kv_cache_memory=kv_memory,
            max_model_len=args.max_model_len or canvas,
            max_num_tokens=max(base.max_num_tokens, settings.batch_size * canvas),
            max_queue=max(base.max_queue, settings.batch_size),
        )
        engine = build_engine(config)
        model = engine.loaded.model
        param = next(model.parameters())
        if args.peak_flops and args.peak_bandwidth:
            rates = PeakRates(
                device_name(param.device),
                str(param.dtype).removeprefix("torch."),
                args.peak_flops,
                args.peak_bandwidth,
                0,
                0,
                source="given",
            )
        else:
            rates = measure_peak_rates(param.device, param.dtype)
            rates = replace(
                rates,
                matmul_flops_per_s=args.peak_flops or rates.matmul_flops_per_s,
                read_bytes_per_s=args.peak_bandwidth or rates.read_bytes_per_s,
            )
        results = run_engine_bench(engine, settings, rates)
        shape = shape_from_config(engine.loaded.config)

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
            "path": args.model_path,
            "family": engine.loaded.family,
            "dtype": str(param.dtype).removeprefix("torch."),
            "load_format": args.load_format,
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
            "cuda_graphs": config.cuda_graphs,
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


# -- CLI ------------------------------------------------------------------------------------------


def _decoding_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from dllm_serve.commands import decoding_overrides

    out = decoding_overrides(args)
    out.pop("block_length", None)  # carried by BenchSettings
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dllm_serve.commands import add_decoding_arguments
    from dllm_serve.config import add_engine_arguments

    add_engine_arguments(parser)
    add_decoding_arguments(parser)
    g = parser.add_argument_group("benchmark")
    g.add_argument("--prompt-len", type=int, default=64, help="random prompt tokens per request")
    g.add_argument("--gen-length", type=int, default=256, help="tokens generated per request")
    g.add_argument(
        "--fixed-tokens-per-step",
        type=int,
        default=None,
        metavar="K",
        help="commit exactly K tokens per step (fixed schedule, no early stop): timings "
        "independent of the weights",
    )
    g.add_argument(
        "--bench-warmup",
        type=int,
        default=2,
        metavar="STEPS",
        help="untimed engine steps run (then cancelled) before the timed wave",
    )
    g.add_argument(
        "--config-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change config.json before building (with --load-format dummy), e.g. n_layers=2",
    )
    g.add_argument("--peak-flops", type=float, default=None, help="use this FLOP/s instead of measuring")
    g.add_argument("--peak-bandwidth", type=float, default=None, help="use this bytes/s instead of measuring")
    g.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    g.add_argument("--output", "-o", default=None, help="also write the JSON report to this file")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(max_batch_size=8)


def run(args: argparse.Namespace) -> int:
    try:
        report = bench_engine(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    print(text if args.json else format_table(report))
    return 0


def register(bench_sub: argparse._SubParsersAction) -> None:
    """Add ``engine`` under ``dllm-serve bench``."""
    parser = bench_sub.add_parser(
        "engine",
        help="offline engine benchmark: per-step time, tokens/s, fraction of the hardware limit",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
