"""Host-to-device uploads that do not make the host wait for the device."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def upload(
    values: torch.Tensor | Sequence, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``values`` (a host tensor or a list) on ``device``.

    On CUDA the copy is staged through pinned memory and queued without waiting: a plain copy from
    pageable memory makes the host wait until the device has finished all queued work, which in
    the middle of a step means waiting for the forward. PyTorch's pinned-memory cache keeps the
    staging buffer alive until the copy is done.
    """
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None:
        host = host.to(dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
