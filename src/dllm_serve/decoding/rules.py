"""Commit rules: which masked positions of the active block receive their token this step.

The rules are named in decoding/registry.py (``RULES``: name, function, parameters, state) and
combined per row by decoding/step.py's ``select_commits``; this module holds their math.

All functions are vectorised over rows, each row with its own parameters, and know nothing of
models or engines. Ties in confidence go to the leftmost position, so a row's choice never
depends on its batch or padding.

Every rule commits at least ``floor`` positions (the linear schedule over the steps left in the
block; 1 when steps = tokens), which also guarantees the most confident position is committed.
"""

from __future__ import annotations

import torch

_NEG = float("-inf")


def confidence_ranks(conf: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Rank of each position by descending confidence among candidates (0 = most confident).

    Stable sort: equal confidences rank left to right. Non-candidates rank last, even behind a
    candidate whose confidence is -inf (so top_k_mask always finds k candidates when they exist).
    """
    masked = conf.masked_fill(~candidates, _NEG)
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    # Second stable pass on the candidate flag alone: candidates first, confidence order kept.
    cand_first = torch.sort((~candidates.gather(-1, order)).to(torch.uint8), dim=-1, stable=True).indices
    order = order.gather(-1, cand_first)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order))
    return ranks


def top_k_mask(conf: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The k[b] most confident candidates of each row."""
    return (confidence_ranks(conf, candidates) < k[:, None]) & candidates


def threshold_mask(conf: torch.Tensor, candidates: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Candidates whose confidence reaches the row's threshold."""
    return (conf >= threshold[:, None]) & candidates


def factor_count(conf: torch.Tensor, candidates: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Fast-dLLM's factor rule as published: the largest n with c(n) >= 1 - f / (n + 1), at least 1.

    c(1) >= c(2) >= ... are the sorted candidate confidences of a row. Fast-dLLM's loop exit adds one
    quirk that its presets keep: when the first position to miss its bound is the last candidate, it
    is committed too (so two masks left always commit both). Returns n per row [B].
    """
    sorted_conf = torch.sort(conf.masked_fill(~candidates, _NEG), dim=-1, descending=True).values
    n = torch.arange(1, conf.shape[-1] + 1, device=conf.device, dtype=conf.dtype)
    ok = sorted_conf >= 1 - factor[:, None].to(conf.dtype) / (n + 1)
    ok[:, 0] = True  # the most confident candidate always commits
    # The bound rises with n and c(n) falls, so the condition holds on a prefix: count it.
    count = torch.cumprod(ok.to(torch.long), dim=-1).sum(-1)
    n_candidates = candidates.sum(-1)
    return torch.where(count == n_candidates - 1, n_candidates, count)


def hierarchy_mask(
    conf: torch.Tensor, candidates: torch.Tensor, threshold: torch.Tensor, low_threshold: torch.Tensor
) -> torch.Tensor:
    """dInfer's hierarchical rule: everything >= threshold, plus the best position of every
    contiguous run of masked positions when it reaches low_threshold."""
    b, p = conf.shape
    starts = candidates & ~torch.nn.functional.pad(candidates, (1, 0))[:, :p]
    segment = torch.cumsum(starts.to(torch.long), dim=-1)  # 1.. for runs; meaningless off candidates
    segment = torch.where(candidates, segment, torch.zeros_like(segment))
    masked = conf.masked_fill(~candidates, _NEG)
    best = torch.full((b, p + 1), _NEG, dtype=conf.dtype, device=conf.device)
    best = best.scatter_reduce(1, segment, masked, reduce="amax", include_self=True)
    is_best = (masked == best.gather(1, segment)) & candidates
    # Leftmost best of each run only.
    pos = torch.arange(p, device=conf.device).expand(b, p)
    first_pos = torch.full((b, p + 1), p, dtype=torch.long, device=conf.device)
    first_pos = first_pos.scatter_reduce(1, segment, torch.where(is_best, pos, p), reduce="amin")
    first = is_best & (pos == first_pos.gather(1, segment))
    return threshold_mask(conf, candidates, threshold) | (first & (conf >= low_threshold[:, None]))


def credit_update(
    credit: torch.Tensor,
    probs: torch.Tensor,
    candidates: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
) -> torch.Tensor:
    """dInfer's credit: decay by beta, then add top1_prob**gamma at each position's top-1 token.

    credit and probs are [B, P, V]; only candidate (still masked) positions accumulate.
    """
    top_p, top_i = probs.max(dim=-1)
    credit = credit * beta[:, None, None]
    add = (top_p ** gamma[:, None]) * candidates
    return credit.scatter_add(-1, top_i[..., None], add[..., None].to(credit.dtype))


def credit_logits(logits: torch.Tensor, credit: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Logits enhanced by accumulated credit: logits + alpha * log(1 + credit)."""
    return logits + alpha[:, None, None] * torch.log1p(credit)
