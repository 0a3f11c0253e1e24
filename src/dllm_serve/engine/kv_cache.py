"""The KV cache: one token arena sized by the memory budget, contiguous extents per sequence.

Every layer's keys and values live in one tensor ``[layers, 2, capacity + 1, kv_heads, head_dim]``
allocated once at start-up. A sequence that caches owns one extent (a contiguous run of arena
tokens) for its prompt and canvas, from admission to retirement, so memory held is proportional to
the tokens in flight. Extent sizes are rounded up to size classes (multiples of 64, four classes
per octave) so that freed extents are reused by requests of similar length and so that the rows of
a batch, when their extents have the same size and sit next to each other, are read through one
strided view of the arena (no copy); other batches gather their rows' keys (a copy). The last arena
token is a sink where padding queries write, never read by a real row. Keys are stored after RoPE
(positions are explicit, so they never change).

Why not fixed-size pages with page tables (vLLM's PagedAttention): in pure PyTorch, attention over
paged keys needs a gather of every row's pages in every layer of every forward, a copy of the
whole cache read per step; a paged attention kernel avoids it but is not portable. Extents keep
views possible at the price of external fragmentation (a long request waits for a contiguous free
run; admission is FIFO, so the arena drains towards it) and rounding to size classes (at most 63
tokens, or 25 % above 512).
See docs/memory.md.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from dllm_serve.tensors import upload

EXTENT_ALIGN = 64  # extents are whole key-length buckets (cuda_graphs.KEY_BUCKET is this)


class KVCacheFullError(RuntimeError):
    """No free run of arena tokens is large enough for the request (admission waits instead)."""


def extent_tokens(tokens: int) -> int:
    """Arena tokens a sequence of ``tokens`` holds: rounded up to a multiple of 64, and above 512
    to a multiple of an eighth of the next power of two (four size classes per octave)."""
    top = 1 << max(0, tokens - 1).bit_length()
    quantum = max(EXTENT_ALIGN, top // 8)
    return max(EXTENT_ALIGN, -(-tokens // quantum) * quantum)


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Keys plus values of one token in every layer."""
    return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Extent:
    """A sequence's run of arena tokens: [start, start + tokens)."""

    start: int
    tokens: int


class KVPool:
    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        # torch.empty: memory is touched (and, on the CPU, becomes resident) only as extents are
        # handed out; ``allocate`` zeroes each extent so stale or never-written keys are finite.
        self.cache = torch.empty(
            (num_layers, 2, capacity + 1, kv_heads, head_dim), dtype=dtype, device=device
        )
        self.keys = [self.cache[i, 0] for i in range(num_layers)]
        self.values = [self.cache[i, 1] for i in range(num_layers)]
        self.capacity = capacity
        self.sink = capacity
        self.bytes_per_token = kv_bytes_per_token(num_layers, kv_heads, head_dim, dtype)
        self._free: list[tuple[int, int]] = [(0, capacity)] if capacity else []  # sorted (start, tokens)
        self.used = 0
        self.peak_used = 0

    @property
    def device(self) -> torch.device:
        return self.cache.device

    @property
    def largest_free(self) -> int:
        return max((n for _, n in self._free), default=0)

    def fits(self, tokens: int) -> bool:
        """Whether a sequence of ``tokens`` can get an extent now."""
        return extent_tokens(tokens) <= self.largest_free

    def allocate(self, tokens: int) -> Extent:
        """The lowest free run that holds ``tokens`` (first fit keeps same-class extents adjacent)."""
        need = extent_tokens(tokens)
        for i, (start, n) in enumerate(self._free):
            if n >= need:
                if n == need:
                    del self._free[i]
                else:
                    self._free[i] = (start + need, n - need)
                self.used += need
                self.peak_used = max(self.peak_used, self.used)
                self.cache[:, :, start : start + need].zero_()
                return Extent(start, need)
        raise KVCacheFullError(
            f"no free run of {need} KV-cache tokens (largest free {self.largest_free} of {self.capacity})"
        )

    def release(self, extent: Extent) -> None:
        """Return an extent, merging it with free neighbours."""
        start, n = extent.start, extent.tokens
        i = bisect.bisect_left(self._free, (start, 0))
        if i < len(self._free) and self._free[i][0] == start + n:  # merge the right neighbour
            n += self._free.pop(i)[1]
        if i > 0 and sum(self._free[i - 1]) == start:  # merge the left neighbour
            start, n = self._free[i - 1][0], self._free[i - 1][1] + n
            i -= 1
            del self._free[i]
        self._free.insert(i, (start, n))
        self.used -= extent.tokens

    def view(self, extents: list[Extent], write: torch.Tensor, key_len: int) -> PoolView:
        """A view for rows in ``extents``; ``write`` holds each query's arena token (see
        ``write_index``). Rows whose extents have one size and follow each other (the usual case
        once the runner orders rows by extent) are read through a strided view of the arena;
        others are gathered, a copy of every layer's keys for those rows."""
        run = strided_from(extents)
        read = run if run is not None else gather_index(extents, key_len, write.device)
        return PoolView(self, write, key_len, read)


def write_index(extents: list[Extent], positions: torch.Tensor, sink: int, valid=None) -> torch.Tensor:
    """Arena token of each query (host tensors): its extent's start + its canvas position, or
    ``sink`` where ``valid`` (a bool mask shaped like ``positions``) is False."""
    tokens = positions + positions.new_tensor([e.start for e in extents])[:, None]
    return tokens if valid is None else torch.where(valid, tokens, sink)


def strided_from(extents: list[Extent]) -> tuple[int, int] | None:
    """(first start, stride) when the extents have one size and are consecutive, else None."""
    first, size = extents[0].start, extents[0].tokens
    if all(e.tokens == size and e.start == first + i * size for i, e in enumerate(extents)):
        return first, size
    return None


def gather_index(extents: list[Extent], key_len: int, device: torch.device | str) -> torch.Tensor:
    """Arena tokens [B, key_len] that rows read: their extent's first ``key_len`` tokens, the
    extent's last token repeated past its end (masked keys that stay inside the row's memory)."""
    ends = upload([[e.start, e.tokens - 1] for e in extents], device, torch.long)
    offsets = torch.arange(key_len, device=device)[None, :]
    return ends[:, :1] + torch.minimum(offsets, ends[:, 1:])


class PoolView:
    """What one batched forward sees: where its queries write, how many keys, how rows read."""

    def __init__(
        self, pool: KVPool, write: torch.Tensor, key_len: int, read: tuple[int, int] | torch.Tensor
    ) -> None:
        self.pool = pool
        self.write = write  # [B, Q] arena tokens; padding queries point at the sink
        self.key_len = key_len
        self.read = read  # (first start, stride): a strided view; or [B, key_len] arena tokens: a gather

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the queries' fresh K/V [B, H, Q, D], return keys/values [B, H, key_len, D]."""
        kbuf, vbuf = self.pool.keys[layer], self.pool.values[layer]
        kbuf[self.write] = k.transpose(1, 2)
        vbuf[self.write] = v.transpose(1, 2)
        if isinstance(self.read, torch.Tensor):
            return kbuf[self.read].transpose(1, 2), vbuf[self.read].transpose(1, 2)
        first, stride = self.read
        rows = self.write.shape[0]

        def rows_of(buf: torch.Tensor) -> torch.Tensor:
            run = buf[first : first + rows * stride].view(rows, stride, *buf.shape[1:])
            return run[:, : self.key_len].transpose(1, 2)

        return rows_of(kbuf), rows_of(vbuf)
