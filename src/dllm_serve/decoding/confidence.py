"""Confidence of each chosen token, the score every commit rule ranks positions by."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dllm_serve.tensors import upload

MEASURES = ("low_confidence", "margin", "entropy")


def confidence(probs: torch.Tensor, chosen: torch.Tensor, measure: Sequence[int]) -> torch.Tensor:
    """Per-position confidence [B, P] from probabilities [B, P, V] and chosen tokens [B, P].

    ``measure`` indexes MEASURES per row: 0 the chosen token's probability (LLaDA's
    low_confidence remasking), 1 the margin top1 - top2, 2 the negative entropy. It is a host
    list, so which measures to compute is decided without waiting for the device.
    """
    out = probs.gather(-1, chosen[..., None]).squeeze(-1)
    rows = upload(measure, probs.device, torch.long)[:, None]
    if 1 in measure:
        top2 = probs.topk(2, dim=-1).values
        out = torch.where(rows == 1, top2[..., 0] - top2[..., 1], out)
    if 2 in measure:
        neg_entropy = (probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        out = torch.where(rows == 2, neg_entropy, out)
    return out
