"""What one forward costs (FLOPs, bytes) and what the device can do (peak rates it measures itself).

The engine benchmark divides a step's FLOPs and bytes by these rates to say how close a step comes
to the limit that binds it: compute (a large matmul in the model's dtype) or memory bandwidth (a
weight-streaming GEMV, which is what a small-batch forward does). Shapes come from config.json,
read by the family's spec (``FamilySpec.cost_shape``: dense or MoE MLP, GQA, head_dim, biases);
``ModelShape`` lives in models/family.py for that reason. The per-call sizes come from the
runner's own report of each forward, so padding and cache spans are counted as the engine runs them
(batch padding for a CUDA graph aside: only real rows count).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from dllm_serve.models.family import ModelShape

if TYPE_CHECKING:
    from dllm_serve.engine.runner import ForwardShape, Runner


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    """The cost shape of a config.json, as its family's spec reads it (models/registry.py), so
    defaults (KV heads, head_dim, padded embedding, experts) match the model."""
    from dllm_serve.models import registry

    return registry.get(registry.detect_family(config)).cost_shape(config)


@dataclass
class ForwardCost:
    """FLOPs and minimum bytes of one batched model call."""

    flops: float
    weight_bytes: float
    kv_bytes: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes

    def __add__(self, other: ForwardCost) -> ForwardCost:
        return ForwardCost(
            self.flops + other.flops, self.weight_bytes + other.weight_bytes, self.kv_bytes + other.kv_bytes
        )


ZERO_COST = ForwardCost(0.0, 0.0, 0.0)


def forward_cost(
    shape: ModelShape, batch: int, queries: int, keys: int, logits: int, elem_bytes: int
) -> ForwardCost:
    """Cost of a forward over ``batch`` rows of ``queries`` tokens attending to ``keys`` keys,
    with LM-head logits for ``logits`` positions per row.

    FLOPs: 2 per multiply-add of every weight matrix per query token, the LM head per logit
    position, and attention's two products (Q K^T and P V) over all heads. Bytes: the weights
    streamed once, plus the keys and values attention reads (K and V, every layer, every row);
    activations are left out, so this is a lower bound on traffic.
    """
    tokens = batch * queries
    flops = 2.0 * shape.n_layers * shape.layer_matmul_params * tokens
    flops += 2.0 * shape.head_params * batch * logits
    flops += 4.0 * shape.n_layers * shape.n_heads * shape.head_dim * tokens * keys
    weight_bytes = float(shape.streamed_params * elem_bytes)
    kv_bytes = 2.0 * shape.n_layers * batch * shape.n_kv_heads * keys * shape.head_dim * elem_bytes
    return ForwardCost(flops, weight_bytes, kv_bytes)


class ForwardRecorder:
    """Records the cost of every model forward the engine's runner makes (eager or replayed)."""

    def __init__(self, runner: Runner, shape: ModelShape) -> None:
        self.shape = shape
        self.elem_bytes = runner.dtype.itemsize
        self.calls = 0
        self.pending = ZERO_COST
        self._runner = runner
        runner.forward_observers.append(self._record)

    def _record(self, fwd: ForwardShape) -> None:
        self.calls += 1
        cost = forward_cost(self.shape, fwd.batch, fwd.queries, fwd.keys, fwd.logits, self.elem_bytes)
        self.pending = self.pending + cost

    def take(self) -> tuple[ForwardCost, int]:
        """The cost recorded since the last call, and how many model calls it was."""
        cost, calls = self.pending, self.calls
        self.pending, self.calls = ZERO_COST, 0
        return cost, calls

    def close(self) -> None:
        self._runner.forward_observers.remove(self._record)


# -- peak rates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeakRates:
    """Rates measured on the device: dense matmul FLOP/s and weight-streaming read bytes/s."""

    device: str
    dtype: str
    matmul_flops_per_s: float
    read_bytes_per_s: float
    matmul_size: int
    gemv_bytes: int
    source: str = "measured"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock reading covers the work it should."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_rate(fn: Callable[[], object], work: float, device: torch.device, repeats: int) -> float:
    """Highest work/second over ``repeats`` timed calls, after one warm-up call."""
    fn()
    synchronize(device)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        elapsed = time.perf_counter() - start
        best = max(best, work / max(elapsed, 1e-9))
    return best


def measure_matmul_rate(
    device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5
) -> tuple[float, int]:
    """FLOP/s of a square matmul in ``dtype`` (several chained, so launch time does not count)."""
    if size is None:
        size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    chain = 10 if device.type == "cuda" else 2

    def run() -> None:
        for _ in range(chain):
            torch.matmul(a, b, out=out)

    return _best_rate(run, 2.0 * size**3 * chain, device, repeats), size


def measure_read_bandwidth(
    device: torch.device, dtype: torch.dtype, nbytes: int | None = None, repeats: int = 5
) -> tuple[float, int]:
    """Bytes/s of a GEMV streaming a matrix far larger than any cache (what decoding weights costs)."""
    if nbytes is None:
        nbytes = (2 << 30) if device.type == "cuda" else (256 << 20)
    elem = torch.empty((), dtype=dtype).element_size()
    cols = 4096
    rows = max(1, nbytes // (cols * elem))
    weight = torch.randn(rows, cols, device=device, dtype=dtype)
    x = torch.randn(cols, 1, device=device, dtype=dtype)
    out = torch.empty(rows, 1, device=device, dtype=dtype)
    chain = 4 if device.type == "cuda" else 1

    def run() -> None:
        for _ in range(chain):
            torch.matmul(weight, x, out=out)

    real_bytes = rows * cols * elem
    return _best_rate(run, float(real_bytes * chain), device, repeats), real_bytes


def device_name(device: torch.device) -> str:
    """Marketing name of the GPU, or the CPU model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} (CPU, {torch.get_num_threads()} torch threads)"


def measure_peak_rates(device: torch.device | str, dtype: torch.dtype) -> PeakRates:
    """Measure both rates on ``device`` in ``dtype`` (about a second on a CPU, less on a GPU)."""
    device = torch.device(device)
    flops, size = measure_matmul_rate(device, dtype)
    bandwidth, nbytes = measure_read_bandwidth(device, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return PeakRates(device_name(device), str(dtype).removeprefix("torch."), flops, bandwidth, size, nbytes)


def roofline_seconds(cost: ForwardCost, rates: PeakRates) -> tuple[float, str]:
    """The least time the work can take on this device, and which limit sets it."""
    compute = cost.flops / rates.matmul_flops_per_s
    memory = cost.bytes / rates.read_bytes_per_s
    return (compute, "compute") if compute >= memory else (memory, "memory")
