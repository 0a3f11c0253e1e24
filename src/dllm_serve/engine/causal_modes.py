"""Decoding over a *causal* committed context: Nemotron-Labs-Diffusion's three generation modes.

The model is trained both to denoise a block and to predict the next token, so the same weights
decode three ways, chosen by the cache policy of the preset (docs/nemotron-labs.md):

* ``causal`` (diffusion, the family's default): the prompt and every finished block are forwarded
  once *causally* ("commit"), which caches their K/V and predicts the next token; that token opens
  the next block, whose other positions are denoised with the active block attending to the cached
  context and to itself ("denoise": the ordinary cached block step and threshold rule).
* ``ar``: autoregressive decoding, one causal forward per token over the uncached tokens.
* ``speculative``: after a causal prefill, a block of ``block_length`` tokens is opened by the
  last accepted token and drafted by diffusion ("draft": the block attends bidirectionally, one
  forward fills every masked position, or several with ``threshold`` > 0), then verified causally
  ("verify"): the longest prefix of the draft the causal predictions agree with is accepted, plus
  the causal prediction after it, and the cache keeps exactly the accepted tokens.

This module plans each sequence's next forward (which span, which keys, which ids) and applies the
outcome of the commit / draft / verify forwards; the runner batches the forwards. Positions beyond
the accepted tokens hold stale K/V that no later query can see (key limits), so "cropping" the
cache is setting ``committed_context``.

Output constraints (engine/constrained.py) follow the frontier rule here too; the canvas is
committed left to right, so the frontier is the next position a causal forward predicts:

* a commit forward's prediction is masked by the grammar's allowed set at that position (unless
  the grammar already forced it: then the forward only caches the context);
* a verify forward's predictions are masked along the prefix of the draft the grammar accepts,
  each by the allowed set after the draft tokens before it (``grammar_masks``), and acceptance
  stops at that prefix: every accepted token is one the grammar accepts, and the token after
  the agreeing prefix is the grammar-masked causal choice. At temperature 0 this is exactly what
  the constrained AR mode picks, token by token (the draft itself stays free);
* the denoising steps of the diffusion mode are ordinary block steps (decoding/step.py's
  constraint hook);
* after each forward the frontier walks over the new tokens (``RowConstraint.advance``): it
  checks room to close, and writes tokens the grammar forces (inside the active block under
  diffusion, anywhere in the output under AR and speculation). Forced tokens are not cached yet,
  so the next forward of an AR or speculative row is a commit over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dllm_serve.engine.sequence import ForwardPlan, Sequence

POLICIES = ("causal", "ar", "speculative")
COMMIT, DENOISE, DRAFT, VERIFY = "commit", "denoise", "draft", "verify"


@dataclass
class Step:
    """One sequence's next forward: its phase, its plan, and the query ids when not the canvas's."""

    phase: str
    plan: ForwardPlan
    ids: torch.Tensor | None = None


def canvas_slack(cache: str, block_length: int) -> int:
    """Canvas positions beyond ``gen_length`` a policy needs: a speculative block opened by the
    last wanted token still spans ``block_length`` positions, as in the published loop."""
    return block_length if cache == "speculative" else 0


def frontier(seq: Sequence) -> int:
    """The first canvas position not yet committed (the canvas is committed left to right here)."""
    masked = (seq.canvas[seq.prompt_len :] == seq.mask_id).nonzero()
    return seq.prompt_len + (int(masked[0]) if len(masked) else seq.canvas.shape[0] - seq.prompt_len)


def _causal(start: int, end: int, logits_start: int, logits_end: int) -> ForwardPlan:
    """Queries [start, end), each seeing the keys up to itself; it writes the cache for real."""
    return ForwardPlan(start, end, torch.arange(start + 1, end + 1), logits_start, logits_end, refresh=True)


def _bidirectional(start: int, end: int) -> ForwardPlan:
    """Queries [start, end) seeing the cached context and the whole span."""
    return ForwardPlan(
        start, end, torch.full((end - start,), end, dtype=torch.long), start, end, refresh=False
    )


def plan(seq: Sequence) -> Step:
    """The sequence's next forward under its policy."""
    p = seq.params
    if p.cache == "causal":
        bs, be = seq.block_start, seq.block_end
        if seq.committed_context < bs:
            return Step(COMMIT, _causal(seq.committed_context, bs, bs - 1, bs))
        return Step(DENOISE, _bidirectional(bs, be))
    f = frontier(seq)
    # AR; the speculative prefill; or tokens a grammar forced, to cache before drafting again.
    if p.cache == "ar" or f == seq.prompt_len or seq.committed_context < f - 1:
        return Step(COMMIT, _causal(seq.committed_context, f, f - 1, f))
    if p.cache != "speculative":
        raise ValueError(f"unknown causal policy {p.cache!r}")
    t, width = f - 1, p.block_length  # the block opens with the last accepted token
    if seq.draft is None:
        seq.draft = torch.full((width,), seq.mask_id, dtype=torch.long)
        seq.draft[0] = seq.canvas[t]
    if bool((seq.draft == seq.mask_id).any()):
        return Step(DRAFT, _bidirectional(t, t + width), seq.draft)
    return Step(VERIFY, _causal(t, t + width, t, t + width), seq.draft)


def force_end(seq: Sequence) -> int:
    """Where a grammar may write the tokens it forces without a forward: inside the active block
    under diffusion (its other positions are denoised), anywhere in the output under AR and
    speculation (the next causal forward reads them)."""
    return seq.block_end if seq.params.cache == "causal" else seq.output_end


def grammar_masks(seq: Sequence, phase: str, position: int) -> list[np.ndarray]:
    """The grammar's allowed sets (bitmask words) for a commit or verify forward's logits, from
    offset 0: at the predicted ``position`` (commit), or along the draft's prefix that the grammar
    accepts (verify). Empty for a draft, a row without an open constraint, or a commit whose
    position the grammar already forced."""
    c = seq.request.constraint
    if c is None or c.done or phase == DRAFT:
        return []
    if phase == COMMIT:
        return [c.allowed_words()] if c.frontier == position else []
    return c.lookahead(_draft(seq)[1:].tolist())


def _walk_grammar(seq: Sequence) -> None:
    """Feed the new tokens to the row's grammar (it may force or close; engine/constrained.py)."""
    c = seq.request.constraint
    if c is None:
        return
    c.advance(seq.canvas, seq.mask_id, force_end(seq), seq.output_end)
    if not c.done and seq.params.cache != "causal":
        # Nothing after the frontier stands. The masks make every prediction one the grammar
        # accepts, so this only matters if the engine and the grammar ever disagree: then the
        # refused position is predicted again rather than skipped.
        seq.canvas[c.frontier + 1 :] = seq.mask_id
        seq.committed_context = min(seq.committed_context, c.frontier - 1)


def apply_commit(seq: Sequence, position: int, token: int) -> None:
    """A causal forward over the uncached tokens before ``position`` predicted its token: write it
    (unless a grammar forced that position already); everything before it is now cached."""
    if int(seq.canvas[position]) == seq.mask_id:
        seq.canvas[position] = token
    seq.committed_context = position
    _walk_grammar(seq)
    if seq.params.cache == "causal" and not bool(seq.masked_in_block().any()):
        seq.block += 1  # a one-token block is complete once its opening token is known
        seq.step_in_block = 0


def apply_draft(seq: Sequence, tokens: torch.Tensor, confidence: torch.Tensor) -> None:
    """Fill the draft's masked positions: all of them (threshold 0, the published default), or
    those at or above ``threshold`` and at least the most confident one."""
    draft = _draft(seq)
    masked = torch.eq(draft, seq.mask_id)
    if seq.params.threshold > 0:
        conf = torch.where(masked, confidence, torch.full_like(confidence, -1.0))
        take = masked & (conf >= seq.params.threshold)
        if not bool(take.any()):
            take = torch.zeros_like(masked)
            take[int(conf.argmax())] = True
    else:
        take = masked
    seq.draft = torch.where(take, tokens, draft)


def _draft(seq: Sequence) -> torch.Tensor:
    if seq.draft is None:
        raise RuntimeError("no draft: plan() opens the block first")
    return seq.draft


def accepted_length(draft: torch.Tensor, predicted: torch.Tensor) -> int:
    """1 + the length of the longest prefix where the causal prediction at i equals draft i + 1."""
    agree = (predicted[:-1] == draft[1:]).long()
    return 1 + int(agree.cumprod(0).sum())


def apply_verify(seq: Sequence, predicted: torch.Tensor, limit: int | None = None) -> tuple[int, int]:
    """Accept the agreeing prefix and the causal prediction after it, at most ``limit`` tokens (a
    grammar's masked prefix, ``grammar_masks``); returns (first position, count)."""
    t = frontier(seq) - 1
    accepted = accepted_length(_draft(seq), predicted)
    if limit is not None:
        accepted = min(accepted, limit)
    seq.canvas[t + 1 : t + 1 + accepted] = predicted[:accepted]
    seq.committed_context = t + accepted
    seq.draft = None
    _walk_grammar(seq)
    return t + 1, accepted
