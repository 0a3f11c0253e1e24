"""Log-probabilities of generated tokens: the ones each token had in the forward that committed it.

Taken from the model's distribution at that forward (after classifier-free guidance, before
temperature, top-p, EOS bans or credit edit the logits), for the requests that ask only. A step
with such rows copies one extra small tensor to the host; other steps are unchanged.
"""

from __future__ import annotations

import torch

from dllm_serve.engine.sequence import Sequence, TokenLogprob


def wanting(seqs: list[Sequence]) -> list[int]:
    """Indices of the rows whose requests asked for log-probabilities."""
    return [i for i, s in enumerate(seqs) if s.request.logprobs is not None]


def before_edits(logits: torch.Tensor, rows: list[int]) -> torch.Tensor | None:
    """Log-softmax of the asking rows' logits [b, P, V]; call before decoding edits them in place."""
    return torch.log_softmax(logits[rows], dim=-1) if rows else None


def chosen_and_top(logp: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """[b, P, 1 + 2k] float64 on the host: each position's chosen token log-prob, top-k log-probs, ids."""
    chosen = logp.gather(-1, tokens[..., None])
    top_lp, top_id = logp.topk(max(1, k), dim=-1)
    return torch.cat([chosen, top_lp, top_id.to(logp.dtype)], -1).double().cpu()


def record(seq: Sequence, old: torch.Tensor, new: torch.Tensor, values: torch.Tensor) -> None:
    """Keep the entries of the block positions this step committed (mask before, token after)."""
    k = seq.request.logprobs or 0
    width = (values.shape[-1] - 1) // 2
    for j in ((old == seq.mask_id) & (new != seq.mask_id)).nonzero()[:, 0].tolist():
        v = values[j]
        top = list(zip(v[1 + width : 1 + width + k].long().tolist(), v[1 : 1 + k].tolist(), strict=True))
        seq.token_logprobs[seq.block_start + j] = TokenLogprob(int(new[j]), float(v[0]), top)


def record_span(seq: Sequence, start: int, tokens: list[int], values: torch.Tensor) -> None:
    """Keep the entries of canvas positions [start, start + len(tokens)), committed from the
    consecutive columns of ``values`` (a causal forward predicts consecutive positions)."""
    k = seq.request.logprobs or 0
    width = (values.shape[-1] - 1) // 2
    for j, token in enumerate(tokens):
        v = values[j]
        top = list(zip(v[1 + width : 1 + width + k].long().tolist(), v[1 : 1 + k].tolist(), strict=True))
        seq.token_logprobs[start + j] = TokenLogprob(token, float(v[0]), top)


def take(seq: Sequence, start: int, count: int) -> list[TokenLogprob] | None:
    """The entries of canvas positions [start, start + count), removed from the sequence."""
    if seq.request.logprobs is None:
        return None
    return [seq.token_logprobs.pop(p) for p in range(start, start + count)]


def none(seq: Sequence) -> list[TokenLogprob] | None:
    """An event's entries when it carries no tokens: [] if the request asked, else None."""
    return [] if seq.request.logprobs is not None else None
