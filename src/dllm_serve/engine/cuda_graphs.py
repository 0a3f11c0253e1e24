"""CUDA graphs of the steady cached block step.

Eager, a cached block step of an 8B model is launch-bound at small batch: every layer issues a
few dozen small kernels, and the host cannot issue them as fast as the GPU runs them. A CUDA graph
replays the whole layer stack with one launch. A graph needs fixed shapes and fixed addresses, so
each shape gets its own static input buffers:

- the batch is padded up to a bucket (1, 2, 4, 8, then multiples of 8); padding rows see every
  key, write their K/V only to the pool's sink position and are dropped from the output;
- the key length is already a multiple of ``KEY_BUCKET`` (the runner rounds it up for every
  cached forward, eager or not, so both paths compute the same thing);
- rows whose extents have one size and follow each other read the cache through a strided view
  of the arena (no copy), and the run's first token and stride are part of the graph's key; other
  rows gather their keys through a static index.

The graph holds the layers only; the final norm and the LM head (a few kernels, and the one large
output) run eagerly on the graph's hidden states, so a graph's static output stays small.
Refresh forwards (whole canvas, once per block) stay eager.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dllm_serve.engine.kv_cache import EXTENT_ALIGN, Extent, KVPool, PoolView, gather_index, strided_from
from dllm_serve.models.base import DiffusionLM

log = logging.getLogger(__name__)

KEY_BUCKET = EXTENT_ALIGN  # KV extents are whole buckets: a bucketed key length stays inside them


def key_bucket(key_len: int, max_len: int) -> int:
    """Key length rounded up to a multiple of KEY_BUCKET, at most the cache length."""
    return min(-(-key_len // KEY_BUCKET) * KEY_BUCKET, max_len)


def batch_bucket(rows: int, limit: int) -> int:
    """Smallest of 1, 2, 4, 8, 16, 24, 32, ... that holds ``rows``, at most ``limit``."""
    bucket = 1 << max(0, rows - 1).bit_length() if rows <= 8 else -(-rows // 8) * 8
    return min(bucket, limit)


@dataclass(frozen=True)
class StepShape:
    """What a graph is captured for: padded batch, query span, key length, logits width, and the
    rows' strided run of extents as (first token, stride) (None: the rows' keys are gathered)."""

    batch: int
    queries: int
    keys: int
    width: int
    run: tuple[int, int] | None


class _StaticStep:
    """One shape's static buffers, and its captured graph (None until captured, or on the CPU)."""

    def __init__(self, model: DiffusionLM, pool: KVPool, shape: StepShape, device: torch.device) -> None:
        b, q = shape.batch, shape.queries
        self.shape = shape
        self.ids = torch.zeros((b, q), dtype=torch.long, device=device)
        self.positions = torch.zeros((b, q), dtype=torch.long, device=device)
        self.mask = torch.zeros((b, q, shape.keys), dtype=torch.bool, device=device)
        self.write = torch.full((b, q), pool.sink, dtype=torch.long, device=device)
        self.index = torch.zeros((b, shape.width), dtype=torch.long, device=device)
        # Gathered rows read the arena tokens in this index; padding rows read token 0 (masked).
        self.gather = torch.zeros((b, shape.keys), dtype=torch.long, device=device)
        read = self.gather if shape.run is None else shape.run
        self.view = PoolView(pool, self.write, shape.keys, read)
        self.model = model
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    def load(self, ids, positions, mask, write, extents: list[Extent], index) -> None:
        """Copy one step's inputs into the static buffers; padding rows become inert."""
        n = ids.shape[0]
        self.ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        self.mask[:n].copy_(mask)
        self.write[:n].copy_(write)
        self.index[:n].copy_(index)
        self.mask[n:] = False
        self.write[n:] = self.view.pool.sink
        if self.shape.run is None:
            self.gather[:n].copy_(gather_index(extents, self.shape.keys, self.gather.device))

    def run_eager(self) -> torch.Tensor:
        return self.model.hidden_states(self.ids, self.positions, self.mask, self.view, self.index)

    def replay(self, mempool) -> torch.Tensor:
        """The layer stack's output for the loaded inputs, by graph replay (captured on first use)."""
        if self.graph is None or self.output is None:
            self.graph, self.output = self.capture(mempool)
        self.graph.replay()
        return self.output

    def capture(self, mempool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream, then record the layer stack. The warm-up writes the current
        rows' K/V exactly as the replay that follows will (same inputs), so it changes nothing."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.run_eager()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls on other threads (the server's) do not invalidate the capture.
        with torch.cuda.graph(graph, pool=mempool, capture_error_mode="thread_local"):
            output = self.run_eager()
        return graph, output


class BlockStepGraphs:
    """Static-shape replay of cached block steps: CUDA graphs on a GPU.

    ``capture=False`` runs the same padded static buffers eagerly; it exists so the padding and
    buffer handling can be checked on machines without CUDA (the graph itself is checked against
    the eager path by tests/gpu).
    """

    def __init__(
        self, model: DiffusionLM, pool: KVPool, *, max_batch: int, capture: bool, max_graphs: int = 64
    ) -> None:
        self.model = model
        self.pool = pool
        self.max_batch = max_batch
        self.capture = capture
        self.max_graphs = max_graphs
        self.device = pool.device
        self.mempool = torch.cuda.graph_pool_handle() if capture else None
        self._steps: dict[StepShape, _StaticStep] = {}

    @property
    def shapes(self) -> list[StepShape]:
        """The shapes met so far, each with its static buffers."""
        return list(self._steps)

    @property
    def captured(self) -> int:
        """How many of those shapes have a captured CUDA graph."""
        return sum(step.graph is not None for step in self._steps.values())

    def hidden_states(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        write: torch.Tensor,
        extents: list[Extent],
        index: torch.Tensor,
    ) -> torch.Tensor | None:
        """Hidden states [B, width, hidden] of one cached forward, or None when its shape gets no
        graph (the graph budget is spent); the caller then runs it eagerly."""
        n, queries = ids.shape
        batch = batch_bucket(n, self.max_batch)
        run = strided_from(extents)
        if run is not None and run[0] + batch * run[1] > self.pool.capacity:  # padding rows past the arena
            run = None
        shape = StepShape(batch, queries, mask.shape[-1], index.shape[1], run)
        step = self._steps.get(shape)
        if step is None:
            if len(self._steps) >= self.max_graphs:
                return None
            step = self._steps[shape] = _StaticStep(self.model, self.pool, shape, self.device)
            log.debug("new static block step %s", shape)
        step.load(ids, positions, mask, write, extents, index)
        if not self.capture:
            return step.run_eager()[:n]
        return step.replay(self.mempool)[:n]
