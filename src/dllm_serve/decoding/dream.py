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

Everything here is per row (one request) except the filters, which are vectorised with per-row
parameters; the engine calls the random draws with each request's own generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dllm_serve.tensors import upload

# Dream's ``alg`` values and the confidence each ranks positions by (engine REMASKING names).
ALGORITHMS = {"maskgit_plus": "low_confidence", "topk_margin": "margin", "entropy": "entropy"}
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


def choose(probs: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """Tokens for probs [N, V]: a categorical draw at temperature > 0, else the most probable."""
    if temperature > 0 and probs.shape[0] > 0:
        return categorical(probs, generator)
    return probs.max(dim=-1).indices


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
