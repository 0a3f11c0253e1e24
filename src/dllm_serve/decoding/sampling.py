"""Token choice: nucleus filtering and LLaDA's float64 Gumbel-max sampling, per row."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from dllm_serve.tensors import upload


def top_p_filter(logits: torch.Tensor, top_p: Sequence[float]) -> torch.Tensor:
    """Set logits outside each row's nucleus to -inf. logits [B, P, V]; top_p per row (1.0 = off).

    ``top_p`` is a host list: whether to sort at all is decided without waiting for the device.
    """
    if all(p >= 1.0 for p in top_p):
        return logits
    top_p_row = upload(top_p, logits.device, logits.dtype)
    # Stable: among equal logits the lower token id is kept first, a fixed, documented tie-break.
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token while the mass before it is below top_p (the top token is always kept).
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p_row[:, None, None]
    drop_sorted &= (top_p_row < 1.0)[:, None, None]
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def gumbel_argmax(logits: torch.Tensor, temperature: float, noise: torch.Tensor) -> torch.Tensor:
    """LLaDA's sampler: argmax of exp(logits) / (-log u)^T in float64 (T = 0 is plain argmax).

    Low-precision Gumbel noise is known to hurt masked-diffusion generation quality, hence float64.
    ``noise`` holds uniform draws shaped like ``logits``.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.double().exp() / (-torch.log(noise)) ** temperature
    return scores.argmax(dim=-1)


def uniform(generator: torch.Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """float64 uniforms from a request's own generator (so a row never depends on its batch)."""
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=device)


@contextmanager
def never_choosing(logits: torch.Tensor, token_id: int) -> Iterator[None]:
    """Inside the block, ``token_id`` cannot win an argmax or a Gumbel draw over ``logits``; its
    logits are put back after, so confidences stay those of the full distribution.

    Used for the mask token: a model that predicts it (an untrained or broken checkpoint) would
    leave the position masked, and a threshold rule's block would never finish."""
    saved = logits[..., token_id].clone()
    logits[..., token_id] = -torch.inf
    try:
        yield
    finally:
        logits[..., token_id] = saved
