"""Write a safetensors file one tensor at a time.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once (5 GB for a full
shard). The format is a little-endian u64 header length, a JSON header of names, dtypes, shapes and
byte offsets, then the raw bytes; since DCP metadata gives every shape and dtype up front, the header
is written first and tensors are streamed after it, so peak memory is one read batch, not one shard.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class StreamingSafetensorsWriter:
    """Writes ``specs`` in order; ``write`` must be called once per spec, in the same order."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.specs = specs
        header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for spec in specs:
            if spec.dtype not in DTYPE_CODES:
                raise ValueError(f"tensor {spec.name!r}: dtype {spec.dtype} has no safetensors code")
            header[spec.name] = {
                "dtype": DTYPE_CODES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors itself does
        self._file = path.open("wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"expected {spec.name} {spec.shape} {spec.dtype}, "
                f"got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            # numpy arrays export the buffer protocol; numpy's stubs say so for Python >= 3.12 only.
            self._file.write(memoryview(flat.view(torch.uint8).numpy()))  # type: ignore[arg-type]
        self._next += 1

    def close(self) -> None:
        """Flush to disk; a file missing tensors is an error, never a silently short file."""
        try:
            if self._next != len(self.specs):
                raise RuntimeError(f"{self.path}: wrote {self._next} of {len(self.specs)} tensors")
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of at most ``max_shard_bytes`` (a larger single tensor gets its own shard)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    """Hugging Face's names: model.safetensors, or model-0000i-of-0000N.safetensors with an index."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(directory: Path, shards: list[list[TensorSpec]], names: list[str]) -> None:
    weight_map = {spec.name: fname for group, fname in zip(shards, names, strict=True) for spec in group}
    total = sum(spec.nbytes for group in shards for spec in group)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
