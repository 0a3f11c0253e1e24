"""Confidence of each chosen token, the score every commit rule ranks positions by."""

from __future__ import annotations

import torch

MEASURES = ("low_confidence", "margin", "entropy")


def confidence(probs: torch.Tensor, chosen: torch.Tensor, measure: torch.Tensor) -> torch.Tensor:
    """Per-position confidence [B, P] from probabilities [B, P, V] and chosen tokens [B, P].

    ``measure`` [B] indexes MEASURES per row: 0 the chosen token's probability (LLaDA's
    low_confidence remasking), 1 the margin top1 - top2, 2 the negative entropy.
    """
    out = probs.gather(-1, chosen[..., None]).squeeze(-1)
    if bool((measure == 1).any()):
        top2 = probs.topk(2, dim=-1).values
        out = torch.where((measure == 1)[:, None], top2[..., 0] - top2[..., 1], out)
    if bool((measure == 2).any()):
        neg_entropy = (probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        out = torch.where((measure == 2)[:, None], neg_entropy, out)
    return out
