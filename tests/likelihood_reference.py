"""A slow, independent reference for the likelihood estimator: the exact expectation by enumeration.

For each block of the continuation and each masked count m, every subset of m positions is
forwarded (full attention for LLaDA; for block diffusion a row of the context, the clean earlier
blocks and the noisy block, with a hand-built block-causal mask, not the engine's two-copy
layout), and the estimator's expectation sum_m (1/m) * mean_{|S|=m} sum_{i in S} log p_i is summed.

``aligned`` (SDAR, LLaDA2): blocks at absolute positions, as their trainers' masks: the row is
positions 0..end of context + continuation, every block before the noisy one clean and
block-causal, the noisy block (which may start with the context's last tokens) seeing them and
itself.
"""

from __future__ import annotations

from itertools import combinations

import torch


@torch.inference_mode()
def masked_logprobs(
    model,
    context: list[int],
    target: list[int],
    span: tuple[int, int],
    subsets: list[tuple[int, ...]],
    block_length: int | None,
    cfg: float,
    shift: bool = False,
    aligned: bool = False,
) -> list[float]:
    """For each subset S of the block ``span``: sum over i in S of log p(target_i | S masked).

    The row holds the context and target[:end]; positions before the block are clean. ``shift``:
    the model predicts position p from the logits at p - 1 (Dream).
    """
    mask_id = model.roles.mask_token_id
    c, (start, end) = len(context), span
    ids = torch.tensor(context + target[:end]).repeat(len(subsets), 1)
    for r, subset in enumerate(subsets):
        ids[r, [c + i for i in subset]] = mask_id
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    if block_length is None:
        mask = None
    else:
        build = aligned_block_causal if aligned else block_causal
        mask = build(c, start, end, block_length).expand(len(subsets), -1, -1)
    logits = model(ids, positions, mask).float()
    if cfg > 0:
        uncond = ids.clone()
        uncond[:, :c] = mask_id
        un = model(uncond, positions, mask).float()
        logits = un + (cfg + 1) * (logits - un)
    logp = torch.log_softmax(logits, -1)
    at = c - 1 if shift else c
    return [sum(float(logp[r, at + i, target[i]]) for i in s) for r, s in enumerate(subsets)]


def block_causal(c: int, start: int, end: int, block_length: int) -> torch.Tensor:
    """[T, T] visibility of context + clean blocks + the noisy block [start, end): a context token
    sees the context up to the end of its block of ``block_length`` (counted from the first token;
    the last, partial block: the whole context), a clean block the context and clean blocks up to
    itself, the noisy block everything."""
    pos = torch.arange(c + end)
    ctx = pos < c
    clean = ~ctx & (pos < c + start)
    owner = torch.where(clean, (pos - c) // block_length, -1)
    ctx_limit = torch.clamp((pos // block_length + 1) * block_length, max=c)
    ctx_vis = ctx[:, None] & ctx[None, :] & (pos[None, :] < ctx_limit[:, None])
    vis = (~ctx[:, None] & ctx[None, :]) | ctx_vis
    vis = vis | (clean[:, None] & clean[None, :] & (owner[None, :] <= owner[:, None]))
    return vis | ~(ctx | clean)[:, None]


def aligned_block_causal(c: int, start: int, end: int, block_length: int) -> torch.Tensor:
    """[T, T] visibility of context + continuation[:end] with blocks at absolute positions and the
    noisy block the one holding continuation tokens [start, end): a token before that block sees
    the blocks up to its own; a token of the noisy block (context tokens included) sees everything
    (the row ends with that block)."""
    noisy_from = (c + start) // block_length * block_length
    pos = torch.arange(c + end)
    blk = pos // block_length
    vis = blk[None, :] <= blk[:, None]
    return vis | (pos >= noisy_from)[:, None]


def aligned_spans(c: int, n: int, block_length: int) -> list[tuple[int, int]]:
    """The continuation's pieces in each absolute block: [start, end) in continuation indices."""
    first, last = c // block_length, (c + n - 1) // block_length
    return [
        (max(k * block_length, c) - c, min((k + 1) * block_length, c + n) - c) for k in range(first, last + 1)
    ]


def exact_expectation(
    model,
    context: list[int],
    target: list[int],
    block_length: int | None = None,
    cfg: float = 0.0,
    shift: bool = False,
    aligned: bool = False,
) -> float:
    """The estimator's exact expectation (see the module docstring)."""
    n = len(target)
    step = block_length or n
    if aligned and block_length is not None:
        spans = aligned_spans(len(context), n, block_length)
    else:
        spans = [(start, min(start + step, n)) for start in range(0, n, step)]
    total = 0.0
    for start, end in spans:
        for m in range(1, end - start + 1):
            subsets = list(combinations(range(start, end), m))
            values = masked_logprobs(
                model, context, target, (start, end), subsets, block_length, cfg, shift, aligned
            )
            total += sum(values) / len(values) / m
    return total
