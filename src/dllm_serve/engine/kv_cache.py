"""Preallocated per-sequence KV cache slots, and the per-forward view the model writes through.

One pool per engine: for every layer, keys and values shaped [slots, kv_heads, max_len + 1,
head_dim], allocated once. A sequence that caches owns one slot from admission to retirement;
the extra last position is a sink where right-padding queries write, so padding never touches
a real cache entry. Keys are stored after RoPE (positions are explicit, so they never change).
"""

from __future__ import annotations

import torch

from dllm_serve.tensors import upload


class SlotsExhaustedError(RuntimeError):
    pass


class KVPool:
    def __init__(
        self,
        num_layers: int,
        slots: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (slots, kv_heads, max_len + 1, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.sink = max_len
        self._free = list(range(slots - 1, -1, -1))

    @property
    def size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise SlotsExhaustedError("no free KV-cache slot")
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def view(self, slots: list[int], write_positions: torch.Tensor, key_len: int) -> PoolView:
        """A view for rows in ``slots``. Consecutive slots (the usual case once the runner orders
        rows by slot) are read through a slice, a view of the pool; any others are gathered, a copy
        of every layer's cache for those rows."""
        index = upload(slots, write_positions.device, torch.long)
        consecutive = consecutive_from(slots)
        read = index if consecutive is None else slice(consecutive, consecutive + len(slots))
        return PoolView(self, index, write_positions, key_len, read)


def consecutive_from(slots: list[int]) -> int | None:
    """The first slot when ``slots`` are consecutive and ascending (readable as a slice), else None."""
    return slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else None


class PoolView:
    """What one batched forward sees: rows' slots, where their queries live, how many keys."""

    def __init__(
        self,
        pool: KVPool,
        slots: torch.Tensor,
        write_positions: torch.Tensor,
        key_len: int,
        read: slice | torch.Tensor,
    ) -> None:
        self.pool = pool
        self.slots = slots  # [B]
        self.write_positions = write_positions  # [B, Q]; padding queries point at the sink
        self.key_len = key_len
        self.read = read  # the rows' slots as a slice (no copy) or an index tensor (a gather)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the queries' fresh K/V, return keys/values [B, H, key_len, D] for attention."""
        rows = self.slots[:, None]
        kbuf, vbuf = self.pool.keys[layer], self.pool.values[layer]
        kbuf[rows, :, self.write_positions] = k.transpose(1, 2)
        vbuf[rows, :, self.write_positions] = v.transpose(1, 2)
        return kbuf[self.read, :, : self.key_len], vbuf[self.read, :, : self.key_len]
