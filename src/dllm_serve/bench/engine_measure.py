"""Measurement for `dllm-serve bench engine`: one timed wave of requests through the real engine.

The wave runs through ``Engine.run_to_completion`` (the engine submits the requests and folds each
one's events into its ``RequestResult``); the benchmark only supplies the iteration, timed between
device synchronisations, and keeps one ``StepRecord`` per iteration from the engine's ``StepInfo``
and the model calls' costs (``hardware.ForwardRecorder``). Turning records into figures is
``engine_report.py``'s job.
"""

from __future__ import annotations

import random
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from tqdm import tqdm

    from dllm_serve.bench.hardware import ForwardCost, ForwardRecorder
    from dllm_serve.engine.algorithms import DecodeParams
    from dllm_serve.engine.engine import Engine, RequestResult
    from dllm_serve.engine.runner import StepInfo
    from dllm_serve.engine.sequence import GenerationRequest


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


def random_prompts(n: int, length: int, vocab: int, avoid: set[int], seed: int) -> list[list[int]]:
    """Random prompt ids that avoid special tokens (mask, stops): no prompt can end a request."""
    rng = random.Random(seed)
    allowed = [t for t in range(vocab) if t not in avoid] if vocab < 1_000_000 else None
    if not allowed:
        raise BenchError("the vocabulary has no ordinary tokens to build prompts from")
    return [[rng.choice(allowed) for _ in range(length)] for _ in range(n)]


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


@dataclass
class Measurement:
    """What one timed wave did: per-iteration records, wall time, each request's folded result."""

    params: DecodeParams
    records: list[StepRecord]
    wall_s: float
    results: dict[str, RequestResult]
    peak_memory: dict[str, int]


def measure(engine: Engine, settings: BenchSettings) -> Measurement:
    """Warm up, then run one timed wave of ``batch_size`` requests."""
    import torch

    from dllm_serve.bench.hardware import ForwardRecorder, shape_from_config, synchronize
    from dllm_serve.engine.sequence import GenerationRequest

    loaded = engine.loaded
    model = engine.runner.model
    params = _params(engine, settings)
    roles = model.roles
    avoid = {roles.mask_token_id, roles.eos_token_id, roles.pad_token_id, *roles.stop_token_ids}
    avoid.update(loaded.tokenizer.hf.all_special_ids)
    prompts = random_prompts(settings.batch_size, settings.prompt_len, model.vocab_size, avoid, settings.seed)

    def wave(tag: str) -> list[GenerationRequest]:
        n = settings.gen_length
        return [GenerationRequest(f"{tag}-{i}", list(p), params, n) for i, p in enumerate(prompts)]

    device = engine.runner.device
    recorder = ForwardRecorder(engine.runner, shape_from_config(loaded.config))
    timer = _StepTimer(engine, recorder, device)
    engine.step_observers.append(timer.infos.append)
    try:
        if settings.warmup_steps > 0:
            _warm_up(engine, wave("warmup"), settings.warmup_steps)
        recorder.take()
        timer.infos.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with _progress(settings) as bar:
            timer.bar = bar
            synchronize(device)
            start = time.perf_counter()
            results = engine.run_to_completion(wave("bench"), step=timer.step)
            wall = time.perf_counter() - start
    finally:
        engine.step_observers.remove(timer.infos.append)
        recorder.close()
    synchronize(device)

    errors = [r.error for r in results.values() if r.error]
    if errors:
        raise BenchError(f"{len(errors)} request(s) failed: {errors[0]}")
    return Measurement(params, timer.records, wall, results, _peak_memory(device))


def _params(engine: Engine, settings: BenchSettings) -> DecodeParams:
    """The wave's decoding parameters; a setting the preset rejects, or a wave whose KV cache does
    not fit in one batch, is a ``BenchError``."""
    from dllm_serve.engine.algorithms import ParamError
    from dllm_serve.engine.kv_cache import extent_tokens

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
    return params


class _StepTimer:
    """``run_to_completion``'s iteration for the timed wave: one engine step between device
    synchronisations, recorded with the step's ``StepInfo`` and model-call costs."""

    def __init__(self, engine: Engine, recorder: ForwardRecorder, device: torch.device) -> None:
        self.engine = engine
        self.recorder = recorder
        self.device = device
        self.infos: list[StepInfo] = []  # the engine's step observer appends here
        self.records: list[StepRecord] = []
        self.bar: tqdm | None = None

    def step(self) -> bool:
        from dllm_serve.bench.hardware import synchronize

        t0 = time.perf_counter()
        worked = self.engine.step()
        synchronize(self.device)
        elapsed = time.perf_counter() - t0
        if not worked:
            return False
        info = self.infos.pop()
        cost, calls = self.recorder.take()
        kind = "refresh" if info.refresh_forwards else "block"
        self.records.append(
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
        if self.bar is not None:
            self.bar.update(info.committed_tokens)
        return True


def _progress(settings: BenchSettings) -> tqdm:
    from tqdm import tqdm

    return tqdm(
        total=settings.batch_size * settings.gen_length,
        unit="tok",
        desc="bench engine",
        disable=not settings.progress,
        file=sys.stderr,
        leave=False,
    )


def _warm_up(engine: Engine, requests: list[GenerationRequest], steps: int) -> None:
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


def _peak_memory(device: torch.device) -> dict[str, int]:
    import torch

    if device.type == "cuda":
        return {
            "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(device),
        }
    # Linux reports ru_maxrss in KiB: the process's resident peak, weights included.
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
