"""Scoring rows and their batched forward: full-canvas forwards without a KV cache.

A row is one model input built from a ``RowLayout`` (a context and a continuation) with some
continuation positions masked; the caller says which continuation positions' log-probabilities it
wants. Rows of any requests are right-padded into one forward; padding is masked out of attention,
so a row's numbers do not depend on its batch beyond float32 rounding: a different padded length
can change the attention kernel's blocking and so the last bits (about 1e-6 in a log-probability,
seen on CPU when 30 keys are padded past 32). Results are otherwise the seed's alone.

Four layouts:

* full attention (LLaDA): ``[context | noisy continuation]``, every token sees every token;
* block diffusion (Nemotron, as trained): ``[context | clean continuation blocks 0..n-2 | noisy
  continuation]`` with repeated position ids; the context is cut into blocks of ``block_length``
  from its first token, each seeing the context up to its own end (the last, partial one the
  whole context); a clean block sees the context and the clean blocks up to itself; a noisy block
  sees the context, the clean blocks before it and itself, as in the ``nemotron`` preset's
  committed-context decoding (``Sequence.committed_plan``);
* aligned block diffusion (SDAR, LLaDA2, as trained: ``aligned``): blocks of ``block_length`` at
  absolute positions over context and continuation alike, in the trainers' two-copy layout
  ``[clean copy of positions 0..s-1 | noisy copy of positions f..c+n-1]``, where f is the start of
  the block holding the first continuation token and s the start of the last block (the clean copy
  of the last block is seen by no noisy token, so it is left out). Clean tokens attend
  block-causally (block <= own); a noisy token sees the clean blocks before its block and its own
  block's noisy tokens, which include the context's tokens in block f (never masked). When the
  context length is a multiple of the block this is the block-diffusion layout above, token for
  token;
* causal (Nemotron-Labs, trained with a next-token objective too): ``[context | continuation]``, all
  clean, each token sees the tokens up to itself, and continuation token i is read from the logits
  at the position before it: the exact autoregressive log-likelihood in one forward.

With ``cfg_scale`` > 0 a row is forwarded twice, the second time with the context replaced by mask
tokens, and the logits are guided as in generation: uncond + (scale + 1) * (cond - uncond).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dllm_serve.decoding.likelihood import block_spans
from dllm_serve.models.base import DiffusionLM
from dllm_serve.tensors import upload

# Token kinds in a scoring row; they decide what each query attends to.
CONTEXT, CLEAN, NOISY, PAD = 0, 1, 2, 3


@dataclass
class RowLayout:
    """A row without its noisy part: ids, position ids, token kinds, block ids, and for each
    continuation position the row index whose logits predict it."""

    ids: torch.Tensor
    positions: torch.Tensor
    kinds: torch.Tensor
    blocks: torch.Tensor
    predict: torch.Tensor
    noisy_start: int
    context: torch.Tensor  # [length] bool: the context's tokens (masked in the unconditional row)
    full: bool
    block_length: int | None
    causal: bool = False
    block_offset: int = 0  # aligned blocks: context tokens in the continuation's first block

    @property
    def length(self) -> int:
        return self.ids.shape[0]

    @property
    def continuation_len(self) -> int:
        return self.predict.shape[0]

    @property
    def spans(self) -> list[tuple[int, int]]:
        """The continuation's blocks, [start, end) in continuation indices."""
        return block_spans(self.continuation_len, self.block_length, self.block_offset)


def row_layout(
    context: list[int],
    continuation: list[int],
    mask_id: int,
    block_length: int | None,
    shift_logits: bool,
    causal: bool = False,
    aligned: bool = False,
) -> RowLayout:
    """The layout of the module docstring; ``block_length`` None: full attention; ``causal``: the
    autoregressive one (the context must not be empty); ``aligned``: blocks at absolute positions."""
    c, n = len(context), len(continuation)
    if causal:
        if not c:
            raise ValueError("causal scoring needs a non-empty context")
        ids = torch.tensor(context + continuation, dtype=torch.long)
        kinds = torch.tensor([CONTEXT] * c + [CLEAN] * n, dtype=torch.long)
        zeros = torch.zeros(c + n, dtype=torch.long)
        predict = torch.arange(c - 1, c + n - 1)
        return RowLayout(
            ids, torch.arange(c + n), kinds, zeros, predict, c + n, _first(c, c + n), False, None, True
        )
    if aligned and block_length is not None:
        return _aligned_layout(context, continuation, mask_id, block_length, shift_logits)
    full = block_length is None
    spans = block_spans(n, block_length)
    clean = 0 if full else spans[-1][0]  # clean copies of every block but the last
    ids = torch.tensor(context + continuation[:clean] + [mask_id] * n, dtype=torch.long)
    positions = torch.cat([torch.arange(c + clean), torch.arange(c, c + n)])
    kinds = torch.tensor([CONTEXT] * c + [CLEAN] * clean + [NOISY] * n, dtype=torch.long)
    block_of = torch.zeros(n, dtype=torch.long)
    for b, (s, e) in enumerate(spans):
        block_of[s:e] = b
    context_blocks = torch.full((c,), -1) if block_length is None else torch.arange(c) // block_length
    blocks = torch.cat([context_blocks, block_of[:clean], block_of])
    noisy = c + clean
    predict = torch.arange(noisy, noisy + n)
    if shift_logits:  # position i is predicted by the logits at i - 1
        predict = predict - 1
        for s, _ in spans:  # a block's first token: the clean token before the block
            predict[s] = c + s - 1
    return RowLayout(ids, positions, kinds, blocks, predict, noisy, _first(c, noisy + n), full, block_length)


def _aligned_layout(
    context: list[int], continuation: list[int], mask_id: int, block_length: int, shift_logits: bool
) -> RowLayout:
    """The aligned two-copy layout of the module docstring."""
    c, n = len(context), len(continuation)
    first = c // block_length * block_length  # the block holding the first continuation token
    offset = c - first  # context tokens in that block: in the noisy copy, never masked
    spans = block_spans(n, block_length, offset)
    clean = first if len(spans) == 1 else c + spans[-1][0]  # the last block's start
    seq = context + continuation
    ids = torch.tensor(seq[:clean] + context[first:] + [mask_id] * n, dtype=torch.long)
    positions = torch.cat([torch.arange(clean), torch.arange(first, c + n)])
    kinds = torch.tensor([CLEAN] * clean + [NOISY] * (offset + n), dtype=torch.long)
    noisy = clean + offset
    predict = torch.arange(noisy, noisy + n)
    if shift_logits:  # position p is predicted by the logits at p - 1
        predict = predict - 1
        for j in range(n):
            if (c + j) % block_length == 0:  # a block's first token: the clean token before it
                predict[j] = c + j - 1
    return RowLayout(
        ids,
        positions,
        kinds,
        positions // block_length,
        predict,
        noisy,
        positions < c,  # the context's tokens, in both copies
        False,
        block_length,
        block_offset=offset,
    )


def _first(k: int, length: int) -> torch.Tensor:
    """[length] bool: the first ``k`` positions."""
    return torch.arange(length) < k


def attention_masks(
    kinds: torch.Tensor, blocks: torch.Tensor, full: torch.Tensor, causal: torch.Tensor
) -> torch.Tensor:
    """[B, T, T] query-key visibility for rows of the three layouts (see the module docstring)."""
    kq, kk = kinds[:, :, None], kinds[:, None, :]
    bq, bk = blocks[:, :, None], blocks[:, None, :]
    real_q, real_k = kq != PAD, kk != PAD
    see_context = real_q & (kk == CONTEXT) & ((kq != CONTEXT) | (bk <= bq))  # context blocks: causal
    clean_q = (kq == CLEAN) & (kk == CLEAN) & (bk <= bq)
    noisy_q = (kq == NOISY) & (((kk == CLEAN) & (bk < bq)) | ((kk == NOISY) & (bk == bq)))
    block_rule = see_context | clean_q | noisy_q
    index = torch.arange(kinds.shape[1], device=kinds.device)
    causal_rule = real_q & real_k & (index[None, :] <= index[:, None])[None]
    out = torch.where(full[:, None, None], real_q & real_k, block_rule)
    return torch.where(causal[:, None, None], causal_rule, out)


@dataclass
class Row:
    """One forward row: ``noisy`` [L] is the continuation with masks; the log-probabilities of
    ``targets`` [L] and the ``top_k`` best tokens are read at the continuation positions
    ``wanted``. ``owner`` and ``tag`` are the caller's (which job, which sample)."""

    layout: RowLayout
    noisy: torch.Tensor
    targets: torch.Tensor
    wanted: torch.Tensor
    cfg_scale: float
    top_k: int
    owner: Any
    tag: Any

    @property
    def cost(self) -> int:
        """Model rows: two with classifier-free guidance."""
        return 2 if self.cfg_scale > 0 else 1


@dataclass
class RowOutput:
    """Per wanted position: the target's log-probability, and the top-k tokens and theirs."""

    target_logprob: torch.Tensor  # [w] float64
    top_logprob: torch.Tensor  # [w, k] float64
    top_id: torch.Tensor  # [w, k] long


@torch.inference_mode()
def forward_rows(model: DiffusionLM, rows: list[Row], mask_id: int) -> list[RowOutput]:
    """One batched forward of ``rows``, with one device-to-host transfer."""
    device = next(model.parameters()).device
    cond = len(rows)
    cfg = [i for i, r in enumerate(rows) if r.cfg_scale > 0]
    all_rows = rows + [rows[i] for i in cfg]
    n = len(all_rows)
    t = max(r.layout.length for r in rows)
    width = max(r.wanted.shape[0] for r in rows)
    k = max(r.top_k for r in rows)
    ids = torch.full((n, t), mask_id, dtype=torch.long)
    positions = torch.zeros((n, t), dtype=torch.long)
    kinds = torch.full((n, t), PAD, dtype=torch.long)
    blocks = torch.zeros((n, t), dtype=torch.long)
    predict = torch.zeros((n, width), dtype=torch.long)
    targets = torch.zeros((n, width), dtype=torch.long)
    full = torch.zeros((n, 1), dtype=torch.long)
    causal = torch.zeros((n, 1), dtype=torch.long)
    for i, r in enumerate(all_rows):
        lay, w = r.layout, r.wanted.shape[0]
        ids[i, : lay.length] = lay.ids
        ids[i, lay.noisy_start : lay.length] = r.noisy
        if i >= cond:  # classifier-free guidance: the context replaced by masks
            ids[i, : lay.length][lay.context] = mask_id
        positions[i, : lay.length] = lay.positions
        kinds[i, : lay.length] = lay.kinds
        blocks[i, : lay.length] = lay.blocks
        predict[i, :w] = lay.predict[r.wanted]
        targets[i, :w] = r.targets[r.wanted]
        full[i] = int(lay.full)
        causal[i] = int(lay.causal)
    packed = upload(torch.cat([ids, positions, kinds, blocks, predict, targets, full, causal], 1), device)
    ids, positions, kinds, blocks, predict, targets, full, causal = packed.split(
        [t, t, t, t, width, width, 1, 1], 1
    )
    mask = attention_masks(kinds, blocks, full[:, 0].bool(), causal[:, 0].bool())
    logits = model.logits(model.hidden_states(ids, positions, mask, None, predict)).float()
    if cfg:
        uncond = logits[cond:]
        scale = upload([rows[i].cfg_scale for i in cfg], device, torch.float32)[:, None, None]
        logits = logits[:cond].clone()
        logits[cfg] = uncond + (scale + 1) * (logits[cfg] - uncond)
    logp = torch.log_softmax(logits, dim=-1)
    target_lp = logp.gather(-1, targets[:cond, :, None])
    top_lp, top_id = logp.topk(k, dim=-1)
    host = torch.cat([target_lp.double(), top_lp.double(), top_id.double()], -1).cpu()
    out = []
    for r, h in zip(rows, host, strict=True):
        h = h[: r.wanted.shape[0]]
        out.append(RowOutput(h[:, 0], h[:, 1 : 1 + r.top_k], h[:, 1 + k : 1 + k + r.top_k].long()))
    return out
