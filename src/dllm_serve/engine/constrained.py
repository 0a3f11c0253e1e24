"""The commit rule that makes constrained diffusion decoding always satisfy its grammar.

A diffusion step may commit any masked position of the active block, in any order; a grammar
reads left to right. The rule joins them through the row's *frontier*, the first position whose
token the grammar has not yet consumed:

1. Before sampling, the logits at the frontier are masked to the grammar's allowed set (stop
   tokens only once the grammar is complete; the decoding step's per-row constraint hook,
   decoding/step.py), and the frontier is always committed. Positions
   beyond it are sampled and committed by the row's own rule, as without a constraint, but stay
   provisional.
2. After the step (on the host, from the block already read back), the frontier walks right over
   committed tokens, feeding each to the grammar. A token the grammar refuses is masked again and
   the walk stops there; later provisional tokens wait for the frontier to reach them. A position
   where the grammar allows exactly one token gets it at once (no forward needed).
3. Every accepted token must leave room to finish. The row keeps a *plan*, a token sequence that
   completes the grammar from the frontier (the closing search's output, engine/grammar.py), and
   the invariant: plan + one stop token fit the output positions left (``max_tokens``). An
   accepted token that is the plan's next token shortens the plan; any other token gets a new
   plan from the search, and is refused if none fits. Then the row closes: its plan and a stop
   token are written at the frontier, which the invariant guarantees fit. The request's
   ``min_tokens`` check makes the invariant hold at the start.

So the emitted text (the committed prefix, which ends at the frontier) is always a prefix of a
valid output, and the output ends with the grammar complete and a stop token within
``max_tokens``. The row finishes as soon as its grammar is complete. Unconstrained rows are never
touched: the masks and forced commits are indexed by the constrained rows only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dllm_serve.decoding.step import Constraint
from dllm_serve.engine.grammar import RowMatcher
from dllm_serve.tensors import upload


class RowConstraint:
    """One constrained row's frontier state (engine thread)."""

    def __init__(self, matcher: RowMatcher, plan: tuple[int, ...] | None) -> None:
        self.matcher = matcher
        self.plan = list(plan) if plan is not None else None  # completes the grammar from the frontier
        self.frontier = -1  # canvas position; set by ``start``
        self.done = False  # the grammar is complete and a stop token is in place
        self._words: np.ndarray | None = None  # allowed set at the frontier, cached

    def start(self, prompt_len: int) -> None:
        self.frontier = prompt_len

    def allowed_words(self) -> np.ndarray:
        if self._words is None:
            self._words = self.matcher.allowed_words()
        return self._words

    def lookahead(self, tokens: list[int]) -> list[np.ndarray]:
        """The allowed sets at the frontier and after each of ``tokens`` in turn, for as long as the
        grammar accepts them (a speculative draft: its verify forward masks each position of the
        prefix it may accept with these). The state is left unchanged."""
        words = [self.allowed_words()]
        for token in tokens:
            if not self.matcher.consume(token):
                break
            words.append(self.matcher.allowed_words())
        self.matcher.rollback(len(words) - 1)
        return words

    def advance(self, canvas: torch.Tensor, mask_id: int, block_end: int, out_end: int) -> None:
        """Walk the frontier over the committed tokens of the host ``canvas`` (edited in place:
        refused tokens are masked again, forced and closing tokens written)."""
        pos = self.frontier
        while not self.done and pos < out_end:
            token = int(canvas[pos])
            if token == mask_id:
                forced = self._forced() if pos < block_end else None
                if forced is None:
                    break
                canvas[pos] = token = forced
            self._words = None
            if token in self.matcher.vocab.stop_ids:
                if not self.matcher.accepting():
                    canvas[pos] = mask_id
                    continue  # masked again (the grammar may force this position's token)
                self.done = True
                break
            if not self.matcher.consume(token):
                canvas[pos] = mask_id
                continue
            left = out_end - pos - 1  # output positions after this token
            plan = self._next_plan(token, left - 1)
            if (plan is None or len(plan) + 1 > left) and self.plan is not None:
                self.matcher.rollback(1)
                self._close(canvas, pos, out_end, mask_id)
                break
            self.plan = plan
            pos += 1
        self.frontier = pos

    def _next_plan(self, token: int, limit: int) -> list[int] | None:
        """A plan from the state after ``token`` (just consumed): the old plan less its first one
        or two tokens when that still completes the grammar (the token was the plan's, did what its
        first token did, or covered two of them, as " a" covers " " and "a"), the old plan whole (the
        token added to something open, such as a string), else a new search."""
        old = self.plan
        if old:
            if old[0] == token:
                return old[1:]
            for tail in (old[1:], old[2:], old):
                if len(tail) <= limit and self.matcher.completes(tail):
                    return tail
        return self.matcher.closing_tokens(limit)

    def _forced(self) -> int | None:
        """The only token the grammar allows at the frontier, if there is exactly one."""
        allowed = self.matcher.vocab.unpack(self.allowed_words())
        ids = np.flatnonzero(allowed)
        if len(ids) == 1:
            return int(ids[0])
        if len(ids) and all(int(i) in self.matcher.vocab.stop_ids for i in ids):
            return self.matcher.vocab.stop_ids[0]
        return None

    def _close(self, canvas: torch.Tensor, pos: int, out_end: int, mask_id: int) -> None:
        """Write the plan and a stop token from ``pos`` (they fit: the invariant). A row without a
        plan (its grammar's closing search failed: no guarantee) only gets the token masked again."""
        closing = self.plan
        if closing is None or pos + len(closing) + 1 > out_end:
            canvas[pos] = mask_id
            return
        for i, t in enumerate(closing):
            self.matcher.consume(t)
            canvas[pos + i] = t
        canvas[pos + len(closing)] = self.matcher.vocab.stop_ids[0]
        self.done = True
        self.frontier = pos + len(closing)


@dataclass
class FrontierGuide:
    """One group's grammar masks for a decoding step: the constrained rows (batch index), their
    frontier offsets in the active block, and the allowed sets, uploaded together (no sync)."""

    rows: torch.Tensor  # [k] long, device
    offsets: torch.Tensor  # [k] long, device
    words: torch.Tensor  # [k, W] int32, device
    index: dict[int, int] = field(default_factory=dict)  # batch row -> k
    _allowed: torch.Tensor | None = None  # [k, vocab] bool, expanded once per step

    @classmethod
    def build(
        cls,
        constraints: list[RowConstraint | None],
        block_starts: list[int],
        width: int,
        device: torch.device,
    ) -> FrontierGuide | None:
        """None when no row of the group has an open constraint whose frontier is in its block."""
        picked = []
        for i, (c, start) in enumerate(zip(constraints, block_starts, strict=True)):
            if c is not None and not c.done and 0 <= c.frontier - start < width:
                picked.append((i, c.frontier - start, c.allowed_words()))
        return cls.at(picked, device)

    @classmethod
    def at(cls, entries: list[tuple[int, int, np.ndarray]], device: torch.device) -> FrontierGuide | None:
        """Masks at chosen positions: (batch row, offset in its logits, allowed words) each; a row
        may have several (a causal verify forward masks each position of the accepted prefix).
        None without entries."""
        if not entries:
            return None
        words = np.stack([w for _, _, w in entries]).view(np.int32)
        head = np.array([[i, off] for i, off, _ in entries], dtype=np.int32)
        packed = upload(torch.from_numpy(np.concatenate([head, words], axis=1)), device)
        index: dict[int, int] = {}
        for k, (i, _, _) in enumerate(entries):
            index.setdefault(i, k)
        return cls(packed[:, 0].long(), packed[:, 1].long(), packed[:, 2:], index)

    def _expanded(self, vocab: int, device: torch.device) -> torch.Tensor:
        """The allowed sets as [entries, vocab] bool, expanded on the device once per step."""
        if self._allowed is None or self._allowed.shape[1] != vocab:
            shifts = torch.arange(32, device=device, dtype=torch.int32)
            bits = ((self.words[:, :, None] >> shifts) & 1).flatten(1)[:, :vocab].bool()
            self._allowed = torch.nn.functional.pad(bits, (0, vocab - bits.shape[1]))
        return self._allowed

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Every entry at once on batch logits [B, P, vocab] (in place): -inf outside its allowed set."""
        allowed = self._expanded(logits.shape[-1], logits.device)
        picked = logits[self.rows, self.offsets]
        logits[self.rows, self.offsets] = picked.masked_fill(~allowed, float("-inf"))
        return logits

    def hook(self, row: int) -> Constraint | None:
        """The decoding step's constraint for batch row ``row`` (decoding/step.py's ``RowStep``):
        its logits [width, vocab] with -inf outside the allowed set at the frontier. None for a row
        without an open constraint."""
        k = self.index.get(row)
        if k is None:
            return None

        def mask(logits: torch.Tensor, block: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
            allowed = self._expanded(logits.shape[-1], logits.device)
            at = self.offsets[k : k + 1]  # a 1-element index tensor: a 0-d one would read back
            logits[at] = logits[at].masked_fill(~allowed[k : k + 1], float("-inf"))
            return logits

        return mask

    def force(self, commit: torch.Tensor) -> torch.Tensor:
        """Every constrained row commits its frontier (in place)."""
        commit[self.rows, self.offsets] = True
        return commit
