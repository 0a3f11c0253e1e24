"""Monte-Carlo ELBO estimates of log p(continuation | context) for masked diffusion models.

Pure host-side functions with no model or engine knowledge: which continuation positions each
Monte-Carlo sample masks, the weight of each masked position's log-probability, and how the
samples combine into an estimate and its standard error.

The estimator (LLaDA's conditional ELBO, applied per block):

* the continuation is cut into blocks (one block for full-attention models; for block-diffusion
  models blocks of ``block_length`` tokens, counted from the end of the context, or, for models
  trained with blocks at absolute positions, a first block that completes the context's last,
  partial block (``offset`` context tokens already in it) and whole blocks after it);
* each sample masks, inside every block of length L, exactly m tokens chosen uniformly at random,
  where m is in {1..L}; over the ``mc_num`` samples the counts are spread evenly (a random offset
  k, then m_j = ((k + floor(j * L / mc_num)) mod L) + 1), so each sample's m is uniform on {1..L}
  and the samples cover the counts in a low-discrepancy way;
* a sample's value is the sum over its masked positions of (L / m) * log p(token | visible tokens);
* the estimate is the mean of the sample values. Its expectation is
  sum over blocks of sum_{m=1..L} (1/m) * E_{|S|=m}[sum_{i in S} log p(x_i | x without S)],
  the ELBO, a lower bound on log p(continuation | context).

Identical mask patterns (always the case for a one-token continuation) are forwarded once and
counted with their multiplicity, which changes neither the estimate nor its standard error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_MC_NUM = 4096


@dataclass(frozen=True)
class MaskSamples:
    """The distinct mask patterns of one request's ``mc_num`` samples.

    ``masks`` [U, L] bool: masked continuation positions; ``weights`` [U, L] float64: the factor of
    each position's log-probability (L_block / m_block where masked, else 0); ``counts`` [U]:
    how many of the samples drew each pattern (they sum to ``mc_num``).
    """

    masks: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor

    @property
    def mc_num(self) -> int:
        return int(self.counts.sum())


def block_spans(length: int, block_length: int | None, offset: int = 0) -> list[tuple[int, int]]:
    """[start, end) of each block of a ``length``-token continuation (None: one block). ``offset``:
    how many tokens before the continuation its first block already holds (absolute blocks: the
    context length modulo the block), so that block has ``block_length - offset`` of its tokens."""
    if block_length is None:
        return [(0, length)]
    head = (block_length - offset % block_length) % block_length  # tokens completing a partial block
    starts = [0, *(s for s in range(head or block_length, length, block_length))]
    return list(zip(starts, [*starts[1:], length], strict=True))


def spread_counts(length: int, mc_num: int, generator: torch.Generator) -> list[int]:
    """Masked-token counts in {1..length} for ``mc_num`` samples: evenly spread, random offset."""
    offset = int(torch.randint(0, length, (), generator=generator))
    return [(offset + (j * length) // mc_num) % length + 1 for j in range(mc_num)]


def draw_masks(
    length: int, mc_num: int, block_length: int | None, generator: torch.Generator, offset: int = 0
) -> MaskSamples:
    """Draw ``mc_num`` mask patterns over a ``length``-token continuation (see the module doc);
    ``offset`` as in ``block_spans``."""
    if length < 1 or mc_num < 1:
        raise ValueError("a continuation of at least one token and mc_num >= 1 are needed")
    masks = torch.zeros((mc_num, length), dtype=torch.bool)
    weights = torch.zeros((mc_num, length), dtype=torch.float64)
    for start, end in block_spans(length, block_length, offset):
        size = end - start
        for j, m in enumerate(spread_counts(size, mc_num, generator)):
            chosen = torch.randperm(size, generator=generator)[:m] + start
            masks[j, chosen] = True
            weights[j, chosen] = size / m
    unique, inverse = torch.unique(masks, dim=0, return_inverse=True)
    counts = torch.bincount(inverse, minlength=unique.shape[0])
    first = torch.full((unique.shape[0],), mc_num, dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(mc_num), reduce="amin")
    return MaskSamples(unique, weights[first], counts)


def sample_value(weights: torch.Tensor, logprobs: torch.Tensor) -> float:
    """One sample's value: the weighted sum of its masked positions' log-probabilities."""
    return float((weights * logprobs.double()).sum())


def combine(values: list[float], counts: list[int]) -> tuple[float, float]:
    """Mean of the samples and the standard error of that mean.

    The standard error uses the i.i.d. formula (sample standard deviation / sqrt(mc_num)); the
    spread counts make the samples negatively correlated, so the true error is at most this.
    """
    n = sum(counts)
    mean = sum(v * c for v, c in zip(values, counts, strict=True)) / n
    if n < 2:
        return mean, 0.0
    var = sum(c * (v - mean) ** 2 for v, c in zip(values, counts, strict=True)) / (n - 1)
    return mean, math.sqrt(var / n)
