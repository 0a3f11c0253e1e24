"""Dream's sampler (``diffusion_generate`` in Dream's published generation_utils.py), as tensor functions.

Dream differs from LLaDA's sampler in three places, each reproduced here:

* **Token choice** (``filter_logits``, ``categorical``): logits are divided by the temperature, then
  nucleus (``top_p``: a token goes when the probability mass *strictly* before it exceeds top_p) and
  ``top_k`` filtering set the dropped logits to the dtype's minimum; at temperature > 0 the token is a
  categorical draw (torch's ``multinomial`` over the renormalised probabilities, the draw
  ``torch.distributions.Categorical`` makes), else the most probable one.
* **Confidence** (``confidence``) comes from those filtered, tempered probabilities: ``maskgit_plus``
  the chosen token's probability, ``topk_margin`` top-1 minus top-2, ``entropy`` sum p log(p + 1e-10).
* **How many commit** (``transfer_count``, ``origin_probability``): with timesteps
  ``linspace(1, eps, steps + 1)`` and step i's t, s, ``int(masked * (1 - s / t))`` positions by
  confidence (all of them at the last step), or, for ``origin``, each masked position independently
  with probability 1 - s / t; float32 arithmetic as in the published code, so the counts match.

``decide_rows`` runs one step for the rows under Dream's rules (``timestep``, ``origin``), each as
Dream's ``diffusion_generate`` decodes a batch of one: the draws come from the row's own generator in
the published order and shapes (``origin``: one uniform per masked position, then a categorical draw
for each position that transfers; the others: a categorical draw for every masked position, then,
with ``alg_temp``, the committed positions drawn over the whole canvas), so a seeded request gives
the published tokens and never depends on its batch. The masked positions come from the host; only
``origin`` at temperature > 0 reads a device value back (which positions transfer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from dllm_serve.tensors import upload

# The commit rules (decoding/registry.py RULES) that are Dream's: they choose the tokens as well.
DREAM_RULES = ("timestep", "origin")
# The confidence measures Dream's algorithms rank by (REMASKING names).
MEASURES = ("low_confidence", "margin", "entropy")
ENTROPY_EPSILON = 1e-10


def timesteps(steps: int, eps: float) -> torch.Tensor:
    """Dream's time grid, float32 as ``torch.linspace`` makes it."""
    return torch.linspace(1, eps, steps + 1)


def transfer_count(masked: int, step: int, steps: int, eps: float) -> int:
    """Positions committed at ``step`` (0-based) of ``steps`` when ``masked`` are still masked."""
    if step >= steps - 1:
        return masked
    grid = timesteps(steps, eps)
    t, s = grid[step], grid[step + 1]
    return int(torch.tensor(masked, dtype=torch.int64) / 1 * (1 - s / t))


def origin_probability(step: int, steps: int, eps: float) -> torch.Tensor | float:
    """``origin``'s per-position transfer probability 1 - s / t (1 at the last step)."""
    if step >= steps - 1:
        return 1
    grid = timesteps(steps, eps)
    return 1 - grid[step + 1] / grid[step]


def filter_logits(
    logits: torch.Tensor, temperature: Sequence[float], top_p: Sequence[float], top_k: Sequence[int]
) -> torch.Tensor:
    """Tempered, nucleus- and top-k-filtered logits [B, P, V]; per-row host parameters.

    top_p >= 1 and top_k == 0 switch a filter off (Dream's None); temperature 0 leaves logits as they are.
    """
    dev = logits.device
    if any(t > 0 for t in temperature):
        scale = upload([t if t > 0 else 1.0 for t in temperature], dev, logits.dtype)
        logits = logits / scale[:, None, None]
    floor = torch.finfo(logits.dtype).min
    if any(p < 1 for p in top_p):
        p = upload(list(top_p), dev, logits.dtype)[:, None, None]
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.cumsum(sorted_logits.softmax(-1), dim=-1)
        drop = cumulative > p
        drop = torch.cat([torch.zeros_like(drop[..., :1]), drop[..., :-1]], dim=-1)
        drop &= p < 1
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), floor)
    if any(k > 0 for k in top_k):
        vocab = logits.shape[-1]
        k = upload([min(k, vocab) if k > 0 else vocab for k in top_k], dev, torch.long)
        kth = torch.sort(logits, dim=-1, descending=True).values.gather(
            -1, (k - 1)[:, None, None].expand(-1, logits.shape[1], 1)
        )
        drop = (logits < kth) & (upload(list(top_k), dev, torch.long) > 0)[:, None, None]
        logits = logits.masked_fill(drop, floor)
    return logits


def categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of probs [N, V]: the draw ``Categorical(probs=probs).sample()`` makes
    (renormalised probabilities, multinomial with replacement), from ``generator``."""
    normalised = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(normalised, 1, True, generator=generator)[:, 0]


def choose(probs: torch.Tensor, temperature: float, generator: torch.Generator, mask_id: int) -> torch.Tensor:
    """Tokens for probs [N, V]: a categorical draw at temperature > 0, else the most probable;
    never the mask token (it would leave the position masked): where it comes out, the most
    probable other token. The draw itself is the published one, so the random stream is too."""
    best = probs.index_fill(-1, torch.tensor([mask_id], device=probs.device), -1.0).max(dim=-1).indices
    if temperature > 0 and probs.shape[0] > 0:
        chosen = categorical(probs, generator)
        return torch.where(chosen == mask_id, best, chosen)
    return best


def confidence(probs: torch.Tensor, chosen: torch.Tensor, measure: str) -> torch.Tensor:
    """Dream's confidence of each chosen token: probability, top-1 minus top-2, or negative entropy."""
    if measure == "margin":
        top2 = torch.sort(probs, dim=-1, descending=True).values
        return top2[..., 0] - top2[..., 1]
    if measure == "entropy":
        return torch.sum(probs * torch.log(probs + ENTROPY_EPSILON), dim=-1)
    return probs.gather(-1, chosen[..., None]).squeeze(-1)


def sample_transfer(
    full_confidence: torch.Tensor, count: int, alg_temp: float, generator: torch.Generator
) -> torch.Tensor:
    """Indices of ``full_confidence`` [L] (-inf off the candidates) to commit: the ``count`` most
    confident (leftmost first among equals), or with ``alg_temp`` > 0 ``count`` draws without
    replacement from softmax(confidence / alg_temp), as Dream's ``torch.multinomial`` does."""
    if alg_temp > 0:
        weights = torch.softmax(full_confidence[None] / alg_temp, dim=-1)
        return torch.multinomial(weights, num_samples=count, generator=generator)[0]
    return torch.sort(full_confidence, descending=True, stable=True).indices[:count]


class DreamRow(Protocol):
    """What a step of Dream's rules reads of a row (decoding/step.py's RowStep has it)."""

    @property
    def params(self) -> Any: ...  # temperature, top_p, top_k, remasking, rule, alg_temp, eps
    @property
    def masked(self) -> tuple[int, ...]: ...
    @property
    def step(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def noise(self) -> Any: ...  # generator, length, offset


def decide_rows(
    logits: torch.Tensor, rows: Sequence[DreamRow], mask_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, commit mask and confidence [B, P] for rows under Dream's rules; ``logits`` [B, P, V]
    are each row's active-block logits (already shifted)."""
    params = [r.params for r in rows]
    filtered = filter_logits(
        logits, [p.temperature for p in params], [p.top_p for p in params], [p.top_k for p in params]
    )
    probs = filtered.softmax(-1)
    dev = logits.device
    shape = logits.shape[:2]
    tokens = torch.full(shape, mask_id, dtype=torch.long, device=dev)
    commit = torch.zeros(shape, dtype=torch.bool, device=dev)
    conf = torch.zeros(shape, dtype=torch.float32, device=dev)
    for i, (r, p) in enumerate(zip(rows, params, strict=True)):
        if not r.masked:
            continue
        where = upload(list(r.masked), dev, torch.long)
        row, gen = probs[i, where], r.noise.generator
        if p.rule == "origin":
            draws = torch.rand(len(r.masked), generator=gen, device=dev)
            transfer = draws < origin_probability(r.step, r.steps, p.eps)
            picked = where[transfer]
            chosen = choose(row[transfer], p.temperature, gen, mask_id)
            tokens[i, picked] = chosen
            commit[i, picked] = True
            conf[i, picked] = row[transfer].gather(-1, chosen[:, None])[:, 0]
            continue
        chosen = choose(row, p.temperature, gen, mask_id)
        scores = confidence(row, chosen, p.remasking)
        tokens[i, where] = chosen
        conf[i, where] = scores
        count = transfer_count(len(r.masked), r.step, r.steps, p.eps)
        if count == 0:
            continue
        # Dream ranks over the whole sequence (the canvas noise span; -inf off the masked positions).
        full = torch.full((r.noise.length,), -torch.inf, dtype=scores.dtype, device=dev)
        full[r.noise.offset + where] = scores
        commit[i, sample_transfer(full, count, p.alg_temp, gen) - r.noise.offset] = True
    return tokens, commit, conf
