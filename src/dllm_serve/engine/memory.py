"""The KV cache's memory budget, decided once at start-up.

On CUDA the cache gets what remains of ``--gpu-memory-utilization`` (a fraction of the device's
memory, vLLM's convention) after the weights, a profiling forward at the largest batch (its peak
is the activations' need) and memory outside PyTorch (CUDA context, other processes). On the CPU,
where a process's share of memory cannot be measured that way, it gets ``--kv-cache-memory``
bytes; an explicit ``--kv-cache-memory`` also overrides the measurement on CUDA.

For block-causal models the prompt cache (``engine/prompt_cache.py``) is carved out of that budget:
``--prompt-cache-memory`` bytes, by default a tenth of it (docs/memory.md has the arithmetic), and
the arena gets the rest, so the total memory the KV cache takes is the same with or without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from dllm_serve.engine.kv_cache import EXTENT_ALIGN, extent_tokens, kv_bytes_per_token

DEFAULT_CPU_KV_MEMORY = 2 * 1024**3
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
DEFAULT_PROMPT_CACHE_SHARE = 0.1  # of the KV budget, for block-causal models
PROFILE_BLOCK = 128  # logits positions per row in the profiling forward (a block of up to 128)

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS.update({"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40})


class KVBudgetError(ValueError):
    """The budget cannot hold one sequence of the longest allowed length (start-up fails)."""


def parse_bytes(text: str | int) -> int:
    """``2GiB``, ``512MiB``, ``1.5G``, ``1e9`` or a plain integer, in bytes (B optional)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]i?)?[bB]?\s*", text)
    if not match:
        raise ValueError(f"not a memory size: {text!r} (examples: 2GiB, 512MiB, 1000000000)")
    try:
        number = float(match.group(1))
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (examples: 2GiB, 512MiB, 1000000000)") from None
    return int(number * _UNITS[(match.group(2) or "").lower()])


def human_bytes(n: float) -> str:
    """1.50 GiB, 512.00 KiB: the largest binary unit that keeps the number at least 1."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class KVPlan:
    """The cache's size: bytes granted, where that figure came from, bytes per token."""

    budget_bytes: int
    source: str
    bytes_per_token: int
    prompt_cache_bytes: int = 0  # carved out of the budget for the prompt cache

    @property
    def capacity(self) -> int:
        """Tokens the arena holds (a multiple of the extent alignment)."""
        tokens = max(0, self.budget_bytes - self.prompt_cache_bytes) // self.bytes_per_token
        return tokens // EXTENT_ALIGN * EXTENT_ALIGN

    def check_fits(self, max_len: int) -> None:
        """Raise KVBudgetError (one line, with the numbers) unless one ``max_len`` sequence fits."""
        need = extent_tokens(max_len)
        if need > self.capacity:
            needed = human_bytes(need * self.bytes_per_token)
            budget = human_bytes(max(0, self.budget_bytes))
            carved = (
                f", less {human_bytes(self.prompt_cache_bytes)} for --prompt-cache-memory,"
                if self.prompt_cache_bytes
                else ""
            )
            raise KVBudgetError(
                f"the KV cache cannot hold one sequence of the longest allowed length: {max_len} tokens "
                f"need {need} x {self.bytes_per_token} B = {needed}, the budget ({self.source}) is "
                f"{budget}{carved} = {self.capacity} tokens; raise --kv-cache-memory or "
                "--gpu-memory-utilization, or lower --max-model-len"
                + (" or --prompt-cache-memory" if self.prompt_cache_bytes else "")
            )


def budget_from_measurements(total: int, free: int, reserved: int, peak: int, utilization: float) -> int:
    """KV bytes on CUDA: ``utilization`` x device memory, less PyTorch's peak (weights plus the
    profiling forward's activations) and less memory outside PyTorch (used - reserved)."""
    outside_torch = max(0, total - free - reserved)
    return int(utilization * total) - peak - outside_torch


def profile_forward(model, batch: int, length: int, width: int, device: torch.device) -> None:
    """The largest forward the engine runs: ``batch`` full canvases of ``length`` tokens, logits
    for ``width`` positions per row and the softmax decoding takes of them."""
    ids = torch.zeros((batch, length), dtype=torch.long, device=device)
    positions = torch.arange(length, device=device).expand(batch, length)
    mask = torch.ones((batch, length, length), dtype=torch.bool, device=device)
    index = torch.arange(width, device=device).expand(batch, width)
    with torch.inference_mode():
        logits = model.logits(model.hidden_states(ids, positions, mask, None, index)).float()
        logits.softmax(-1)


def plan_kv_cache(
    model, config, device: torch.device, dtype: torch.dtype, max_len: int, block_causal: bool = False
) -> KVPlan:
    """The KV budget for ``model`` under ``config`` (EngineConfig), checked against ``max_len``;
    ``block_causal`` models get a prompt cache carved out of it."""
    per_token = kv_bytes_per_token(model.num_layers, model.num_kv_heads, model.head_dim, dtype)
    if not 0 < config.gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {config.gpu_memory_utilization}")
    if config.kv_cache_memory is not None:
        plan = KVPlan(
            parse_bytes(config.kv_cache_memory), f"--kv-cache-memory {config.kv_cache_memory}", per_token
        )
    elif device.type == "cuda":
        plan = KVPlan(*_cuda_budget(model, config, device, max_len), per_token)
    else:
        plan = KVPlan(DEFAULT_CPU_KV_MEMORY, "the CPU default --kv-cache-memory 2GiB", per_token)
    plan = replace(plan, prompt_cache_bytes=prompt_cache_bytes(plan.budget_bytes, config, block_causal))
    plan.check_fits(max_len)
    return plan


def prompt_cache_bytes(kv_budget: int, config, block_causal: bool) -> int:
    """``--prompt-cache-memory`` (default: a tenth of the KV budget) for block-causal models; 0 for
    full attention, whose prompt K/V cannot be reused across requests."""
    if not block_causal:
        return 0
    if config.prompt_cache_memory is not None:
        return parse_bytes(config.prompt_cache_memory)
    return int(max(0, kv_budget) * DEFAULT_PROMPT_CACHE_SHARE)


def _cuda_budget(model, config, device: torch.device, max_len: int) -> tuple[int, str]:
    batch = config.max_batch_size
    length = max(1, min(max_len, config.max_num_tokens // batch))
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        profile_forward(model, batch, length, min(length, PROFILE_BLOCK), device)
    except torch.cuda.OutOfMemoryError:
        raise KVBudgetError(
            f"the profiling forward ({batch} canvases of {length} tokens: --max-batch-size, "
            "--max-num-tokens) does not fit on the device next to the weights; lower either"
        ) from None
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    util = config.gpu_memory_utilization
    outside = human_bytes(max(0, total - free - reserved))
    source = (
        f"--gpu-memory-utilization {util} of {human_bytes(total)}, less a peak of {human_bytes(peak)} for "
        f"weights and a {batch} x {length}-token profiling forward, less {outside} outside PyTorch"
    )
    return budget_from_measurements(total, free, reserved, peak, util), source
