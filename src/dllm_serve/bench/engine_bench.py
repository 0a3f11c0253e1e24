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

This module is the command: its flags, the model directory and engine it builds, and
``run_engine_bench``, which measures (``engine_measure.py``) and then summarises
(``engine_report.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dllm_serve.bench.engine_measure import BenchError, BenchSettings, measure

if TYPE_CHECKING:
    from dllm_serve.bench.hardware import PeakRates
    from dllm_serve.engine.engine import Engine

log = logging.getLogger(__name__)

SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "models" / "configs"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# -- setup ----------------------------------------------------------------------------------------


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


def check_family_supported(model_dir: Path) -> None:
    """A clear error, before any weights load, when no registered family serves the checkpoint."""
    from dllm_serve.models.registry import detect_family

    try:
        detect_family(json.loads((model_dir / "config.json").read_text()))
    except ValueError as exc:
        raise BenchError(str(exc)) from exc


def batch_kv_bytes(model_dir: Path, batch: int, canvas: int, dtype: str) -> int:
    """KV memory of ``batch`` sequences of ``canvas`` tokens: the benchmark's default budget, so that
    its peak-memory figure is weights + activations + the batch's cache, not the whole device."""
    import torch

    from dllm_serve.bench.hardware import shape_from_config
    from dllm_serve.engine.kv_cache import extent_tokens, kv_bytes_per_token

    shape = shape_from_config(json.loads((model_dir / "config.json").read_text()))
    per_token = kv_bytes_per_token(shape.n_layers, shape.n_kv_heads, shape.head_dim, getattr(torch, dtype))
    return batch * extent_tokens(canvas) * per_token


# -- measure, then report --------------------------------------------------------------------------


def run_engine_bench(engine: Engine, settings: BenchSettings, rates: PeakRates) -> dict[str, Any]:
    """Warm up, run one timed wave of ``batch_size`` requests, summarise it (the report's ``results``)."""
    from dllm_serve.bench.engine_report import results

    return results(measure(engine, settings), rates)


def bench_engine(args: argparse.Namespace) -> dict[str, Any]:
    """Build the engine from the CLI flags, measure peak rates, run the benchmark; the JSON report."""
    from dllm_serve.bench.engine_report import build_report
    from dllm_serve.bench.hardware import PeakRates, device_name, measure_peak_rates, shape_from_config
    from dllm_serve.config import engine_config_from_args
    from dllm_serve.engine.engine import Engine, build_engine
    from dllm_serve.engine.memory import parse_bytes

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
    check_family_supported(model_dir)
    if args.trust_remote_code:
        raise BenchError("bench engine measures the native engine; --trust-remote-code is not supported")

    with tempfile.TemporaryDirectory(prefix="dllm-bench-") as tmp:
        if config_overrides:
            model_dir = patched_model_dir(model_dir, config_overrides, Path(tmp) / "model")
        base = engine_config_from_args(args)
        canvas = settings.prompt_len + settings.gen_length + (settings.block_length or 0)
        # No prompt cache unless asked for: the timed wave repeats the warm-up's prompts, whose
        # forwards reuse would skip (block-causal models); an asked-for one is added to the budget.
        prompt_cache = base.prompt_cache_memory or "0"
        kv_memory = base.kv_cache_memory or str(
            batch_kv_bytes(model_dir, settings.batch_size, canvas, base.resolved_dtype())
            + parse_bytes(prompt_cache)
        )
        config = replace(
            base,
            model_path=str(model_dir),
            kv_cache_memory=kv_memory,
            prompt_cache_memory=prompt_cache,
            max_model_len=args.max_model_len or canvas,
            max_num_tokens=max(base.max_num_tokens, settings.batch_size * canvas),
            max_queue=max(base.max_queue, settings.batch_size),
        )
        engine = build_engine(config)
        if not isinstance(engine, Engine):  # --trust-remote-code is refused above
            raise BenchError("bench engine measures the native engine")
        param = next(engine.runner.model.parameters())
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

    return build_report(
        model_path=args.model_path,
        load_format=args.load_format,
        config_overrides=config_overrides,
        engine=engine,
        settings=settings,
        cuda_graphs=config.cuda_graphs,
        rates=rates,
        shape=shape,
        results=results,
    )


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
    from dllm_serve.bench.engine_report import format_table

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
