"""Likelihood scoring inside the engine loop: batched forwards that share the generation loop.

Two kinds of scoring request, each turned on the engine thread into a job that yields rows
(``engine/scoring_rows.py``) and folds their log-probabilities back:

A model trained autoregressively too (``causal``: Nemotron-Labs) is scored exactly instead: one
causal forward gives every continuation token's log-probability given everything before it; its
greedy check is whether each of them is the argmax there.

* ``ScoringRequest`` (``/v1/loglikelihood``): the Monte-Carlo ELBO of a continuation given a
  context (``decoding/likelihood.py``), plus LLaDA's greedy check when asked: from the fully masked
  continuation (block by block for block diffusion), commit one token per forward, the most
  confident masked position's argmax; the continuation is greedy when every committed token
  equals it (the check stops at the first miss).
* ``TokenLogprobRequest`` (``/v1/completions`` with ``echo`` and ``logprobs``): each prompt token's
  log-probability with that token alone masked, and the top-k tokens there; optionally one
  generated token (the argmax at one mask appended to the prompt).

Each engine iteration, after the generation step, ``ScoringQueue.step`` takes rows from the jobs in
arrival order (rows of many requests share one forward, up to ``max_batch_size`` rows and
``max_num_tokens`` tokens), runs one forward and folds the results. A job ends with one
``ScoringEvent``. Mask draws come from the request's own generator, so a result depends on its
seed only, not on what shares its forwards.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dllm_serve.config import EngineConfig
from dllm_serve.decoding.likelihood import MAX_MC_NUM as MAX_MC_NUM  # the server's bound on mc_num
from dllm_serve.decoding.likelihood import block_spans, combine, draw_masks, sample_value
from dllm_serve.engine.scoring_rows import Row, RowLayout, RowOutput, forward_rows, row_layout
from dllm_serve.engine.sequence import TokenLogprob
from dllm_serve.models.base import DiffusionLM

log = logging.getLogger(__name__)

NAN_ERROR = "numerical error: the model produced NaN or infinite logits"


@dataclass
class ScoringRequest:
    """log p(continuation | context). ``block_length`` None: the full-attention estimator."""

    request_id: str
    context_ids: list[int]
    continuation_ids: list[int]
    mc_num: int = 128
    cfg_scale: float = 0.0
    seed: int | None = None
    check_greedy: bool = False
    block_length: int | None = None
    shift_logits: bool = False
    causal: bool = False  # exact autoregressive log-likelihood (one forward; mc_num unused)
    aligned: bool = False  # blocks at absolute positions over context and continuation (SDAR, LLaDA2)


@dataclass
class TokenLogprobRequest:
    """Per-token log-probabilities of a prompt (each token alone masked) and ``generate`` (0 or 1)
    greedy tokens after it. Block diffusion: a token sees the clean blocks before its own block
    (blocks of ``block_length`` from the prompt's start) and its own block; with ``aligned`` the
    generated token shares the prompt's last, partial block."""

    request_id: str
    prompt_ids: list[int]
    score_prompt: bool = True
    top_k: int = 1
    generate: int = 0
    block_length: int | None = None
    shift_logits: bool = False
    causal: bool = False  # each token's autoregressive log-probability, all from one forward
    aligned: bool = False  # blocks at absolute positions (the prompt's blocks are so already)


@dataclass
class ScoringEvent:
    """A scoring request's one event. ``finish_reason``: "stop" (scored), "abort" or "error".

    ELBO requests set ``logprob``, ``stderr``, ``num_tokens`` and ``is_greedy``; token requests set
    ``tokens`` (None for the first prompt token, which has nothing to condition on) and
    ``generated``.
    """

    request_id: str
    finish_reason: str
    logprob: float | None = None
    stderr: float | None = None
    num_tokens: int = 0
    is_greedy: bool | None = None
    tokens: list[TokenLogprob | None] = field(default_factory=list)
    generated: list[TokenLogprob] = field(default_factory=list)
    forwards: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return True


ScoringSink = Callable[[ScoringEvent], None]
AnyRequest = ScoringRequest | TokenLogprobRequest


class _Job:
    """A request's state on the engine thread: rows to forward, results folded back."""

    def __init__(self, request_id: str, sink: ScoringSink) -> None:
        self.request_id = request_id
        self.sink = sink
        self.forwards = 0
        self.error: str | None = None
        self.done = False

    def next_row(self) -> Row | None:
        """The next row to forward now, or None (all taken, or waiting for a result)."""
        raise NotImplementedError

    def fold(self, row: Row, out: RowOutput) -> None:
        raise NotImplementedError

    def finished(self) -> bool:
        raise NotImplementedError

    def event(self) -> ScoringEvent:
        raise NotImplementedError


class ElboJob(_Job):
    """Monte-Carlo ELBO samples (deduplicated) and the optional greedy check."""

    def __init__(self, request: ScoringRequest, sink: ScoringSink, mask_id: int) -> None:
        super().__init__(request.request_id, sink)
        self.request = request
        self.mask_id = mask_id
        seed = request.seed if request.seed is not None else secrets.randbits(62)
        n = len(request.continuation_ids)
        self.layout = row_layout(
            request.context_ids,
            request.continuation_ids,
            mask_id,
            request.block_length,
            request.shift_logits,
            request.causal,
            request.aligned,
        )
        if request.causal:  # one exact "sample": every position, weight 1
            self.masks, self.weights, self.counts = torch.ones(1, n, dtype=torch.bool), torch.ones(1, n), [1]
        else:
            gen = torch.Generator().manual_seed(seed)
            samples = draw_masks(n, request.mc_num, request.block_length, gen, self.layout.block_offset)
            self.masks, self.weights = samples.masks, samples.weights
            self.counts = samples.counts.tolist()
        self.target = torch.tensor(request.continuation_ids, dtype=torch.long)
        self.values: list[float | None] = [None] * len(self.counts)
        self.next_sample = 0
        greedy_rows = request.check_greedy and not request.causal  # causal: read off the one row
        self.greedy = torch.full((n,), mask_id, dtype=torch.long) if greedy_rows else None
        self.greedy_in_flight = False
        self.is_greedy: bool | None = None

    def _row(self, noisy: torch.Tensor, wanted: torch.Tensor, tag: int | None) -> Row:
        return Row(self.layout, noisy, self.target, wanted, self.request.cfg_scale, 1, self, tag)

    def next_row(self) -> Row | None:
        if self.greedy is not None and not self.greedy_in_flight:
            self.greedy_in_flight = True
            return self._row(self.greedy.clone(), torch.arange(self.target.shape[0]), None)
        if self.next_sample < len(self.values):
            j, self.next_sample = self.next_sample, self.next_sample + 1
            mask = self.masks[j]
            if self.request.causal:  # nothing is masked: the continuation is part of the layout
                return self._row(torch.empty(0, dtype=torch.long), mask.nonzero()[:, 0], j)
            return self._row(torch.where(mask, self.mask_id, self.target), mask.nonzero()[:, 0], j)
        return None

    def fold(self, row: Row, out: RowOutput) -> None:
        if row.tag is not None:  # a Monte-Carlo sample
            if not bool(torch.isfinite(out.target_logprob).all()):
                self.error = NAN_ERROR
                return
            self.values[row.tag] = sample_value(self.weights[row.tag][row.wanted], out.target_logprob)
            if self.request.causal and self.request.check_greedy:
                self.is_greedy = bool((out.top_id[:, 0] == self.target[row.wanted]).all())
            return
        self._greedy_step(out.top_logprob[:, 0], out.top_id[:, 0])

    def _greedy_step(self, top_lp: torch.Tensor, top_id: torch.Tensor) -> None:
        """Commit the most confident masked position's argmax, or stop at the first miss."""
        self.greedy_in_flight = False
        state = self.greedy
        assert state is not None
        candidates = state == self.mask_id
        if not self.layout.full:  # block diffusion: the first block that still has masks
            start, end = next((s, e) for s, e in self.layout.spans if candidates[s:e].any())
            candidates[:start] = False
            candidates[end:] = False
        pos = int(torch.where(candidates, top_lp, float("-inf")).argmax())
        if int(top_id[pos]) != int(self.target[pos]):
            self.is_greedy, self.greedy = False, None
            return
        state[pos] = self.target[pos]
        if not bool((state == self.mask_id).any()):
            self.is_greedy, self.greedy = True, None

    def finished(self) -> bool:
        return self.greedy is None and not self.greedy_in_flight and all(v is not None for v in self.values)

    def event(self) -> ScoringEvent:
        mean, stderr = combine([v for v in self.values if v is not None], self.counts)
        return ScoringEvent(
            self.request_id,
            "stop",
            logprob=mean,
            stderr=stderr,
            num_tokens=len(self.request.continuation_ids),
            is_greedy=self.is_greedy,
            forwards=self.forwards,
        )


class TokenLogprobJob(_Job):
    """One row per prompt token after the first (that token alone masked), and the generated token."""

    def __init__(self, request: TokenLogprobRequest, sink: ScoringSink, mask_id: int) -> None:
        super().__init__(request.request_id, sink)
        self.request = request
        self.mask_id = mask_id
        prompt = request.prompt_ids
        if request.generate > 1:
            raise ValueError("token log-probabilities generate at most one token")
        # (layout, offset of its continuation in the prompt): one layout for full attention; for
        # block diffusion one per block, its context the prompt before the block.
        self.pieces: list[tuple[RowLayout, int]] = []
        self.causal = request.causal
        if self.causal:  # one row: token i + 1 read at position i
            self.pieces.append((row_layout(prompt[:1], prompt[1:], mask_id, None, False, True), 1))
        for s, e in block_spans(len(prompt), request.block_length) if not self.causal else []:
            context, block = (prompt[:s], prompt[s:e]) if request.block_length else ([], prompt)
            self.pieces.append(
                (
                    row_layout(
                        context,
                        block,
                        mask_id,
                        request.block_length,
                        request.shift_logits,
                        aligned=request.aligned,
                    ),
                    s,
                )
            )
            if not request.block_length:
                break
        self.todo: list[tuple[int, int | None]] = [
            (p, i)
            for p, (lay, s) in enumerate(self.pieces)
            for i in range(lay.continuation_len)
            if s + i and request.score_prompt
        ]
        if self.causal:
            self.todo = [(0, None)] if request.score_prompt and len(prompt) > 1 else []
        self.tokens: list[TokenLogprob | None] = [None] * len(prompt)
        self.generated: list[TokenLogprob] = []
        self.gen_left = request.generate
        self.in_flight = 0

    def next_row(self) -> Row | None:
        r = self.request
        if self.todo:
            piece, i = self.todo.pop()
            layout, start = self.pieces[piece]
            target = torch.tensor(r.prompt_ids[start : start + layout.continuation_len])
            if i is None:  # causal: every position of the one row
                self.in_flight += 1
                wanted = torch.arange(layout.continuation_len)
                return Row(
                    layout, torch.empty(0, dtype=torch.long), target, wanted, 0.0, r.top_k, self, start
                )
            noisy = target.clone()
            noisy[i] = self.mask_id
            self.in_flight += 1
            return Row(layout, noisy, target, torch.tensor([i]), 0.0, r.top_k, self, start + i)
        if self.gen_left:
            self.gen_left -= 1
            layout = row_layout(
                r.prompt_ids,
                [self.mask_id],
                self.mask_id,
                r.block_length,
                r.shift_logits,
                self.causal,
                r.aligned,
            )
            mask = torch.tensor([self.mask_id])
            self.in_flight += 1
            return Row(layout, mask, mask, torch.tensor([0]), 0.0, r.top_k, self, None)
        return None

    def fold(self, row: Row, out: RowOutput) -> None:
        self.in_flight -= 1
        if not bool(torch.isfinite(out.top_logprob).all()):
            self.error = NAN_ERROR
            return
        if self.causal and row.tag is not None:  # the one row: every prompt token after the first
            for j, w in enumerate(row.wanted.tolist()):
                top_j = list(zip(out.top_id[j].tolist(), out.top_logprob[j].tolist(), strict=True))
                token = int(row.targets[w])
                self.tokens[row.tag + w] = TokenLogprob(token, float(out.target_logprob[j]), top_j)
            return
        top = list(zip(out.top_id[0].tolist(), out.top_logprob[0].tolist(), strict=True))
        if row.tag is None:
            self.generated.append(TokenLogprob(top[0][0], top[0][1], top))
        else:
            self.tokens[row.tag] = TokenLogprob(
                int(row.targets[row.wanted[0]]), float(out.target_logprob[0]), top
            )

    def finished(self) -> bool:
        return not self.todo and not self.gen_left and not self.in_flight

    def event(self) -> ScoringEvent:
        return ScoringEvent(
            self.request_id, "stop", tokens=self.tokens, generated=self.generated, forwards=self.forwards
        )


def make_job(request: AnyRequest, sink: ScoringSink, mask_id: int) -> _Job:
    if isinstance(request, ScoringRequest):
        return ElboJob(request, sink, mask_id)
    return TokenLogprobJob(request, sink, mask_id)


@dataclass
class ScoringStats:
    rows: int = 0
    forwards: int = 0
    finished: int = 0


class ScoringQueue:
    """Scoring jobs in arrival order, stepped by the engine thread.

    ``submit`` and ``abort`` may be called from any thread; they share the scheduler's condition so
    a submission wakes an idle engine loop.
    """

    def __init__(self, model: DiffusionLM, config: EngineConfig, condition: threading.Condition) -> None:
        self.model = model
        self.config = config
        self.mask_id = model.roles.mask_token_id
        self._cond = condition
        self._arrivals: deque[tuple[AnyRequest, ScoringSink]] = deque()
        self._aborts: set[str] = set()
        self._jobs: list[_Job] = []
        self._carry: list[Row] = []  # rows taken but left out of the last forward (budget)

    # -- any thread (callers hold no lock) ------------------------------------------------------

    def submit(self, request: AnyRequest, sink: ScoringSink) -> None:
        with self._cond:
            self._arrivals.append((request, sink))
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify()

    def abort_all(self) -> None:
        """Abort every job (at shutdown, once the engine thread has stopped)."""
        with self._cond:
            arrivals, self._arrivals = list(self._arrivals), deque()
        for request, sink in arrivals:
            _send(sink, ScoringEvent(request.request_id, "abort"))
        for job in self._jobs:
            _send(job.sink, ScoringEvent(job.request_id, "abort", forwards=job.forwards))
        self._jobs, self._carry = [], []

    # -- with the condition's lock held -------------------------------------------------------

    def pending(self) -> bool:
        """Work to do (the caller holds the condition's lock)."""
        return bool(self._arrivals or self._jobs or self._aborts)

    def counts(self) -> tuple[int, int]:
        """(waiting, running): jobs whose first row has not / has been forwarded."""
        started = sum(1 for j in self._jobs if j.forwards)
        return len(self._arrivals) + len(self._jobs) - started, started

    # -- engine thread --------------------------------------------------------------------------

    def step(self) -> ScoringStats | None:
        """Take arrivals and aborts, run one batched forward of scoring rows; None when idle."""
        with self._cond:
            arrivals, self._arrivals = list(self._arrivals), deque()
            aborts, self._aborts = self._aborts, set()
        for request, sink in arrivals:
            if request.request_id in aborts:
                _send(sink, ScoringEvent(request.request_id, "abort"))
                continue
            try:
                self._jobs.append(make_job(request, sink, self.mask_id))
            except ValueError as exc:
                _send(sink, ScoringEvent(request.request_id, "error", error=str(exc)))
        for job in self._jobs:
            if job.request_id in aborts:
                job.done = True
                _send(job.sink, ScoringEvent(job.request_id, "abort", forwards=job.forwards))
        self._drop_done()
        if not self._jobs:
            return None
        rows = self._take_rows()
        stats = ScoringStats(rows=len(rows), forwards=self._run_isolated(rows))
        for job in self._jobs:
            if not job.done and (job.error is not None or job.finished()):
                job.done = True
                stats.finished += 1
                if job.error is not None:
                    _send(
                        job.sink,
                        ScoringEvent(job.request_id, "error", forwards=job.forwards, error=job.error),
                    )
                else:
                    _send(job.sink, job.event())
        self._drop_done()
        return stats

    def _drop_done(self) -> None:
        self._jobs = [j for j in self._jobs if not j.done]
        self._carry = [r for r in self._carry if not r.owner.done]

    def _take_rows(self) -> list[Row]:
        """Rows for one forward: carried rows first, then jobs in arrival order."""
        rows: list[Row] = []
        budget_rows, budget_tokens = self.config.max_batch_size, self.config.max_num_tokens
        pending, self._carry = self._carry, []

        def fits(row: Row) -> bool:
            return not rows or (row.cost <= budget_rows and row.cost * row.layout.length <= budget_tokens)

        for job in self._jobs:
            while True:
                row = pending.pop(0) if pending else job.next_row()
                if row is None:
                    break
                if not fits(row):
                    self._carry = [row, *pending]
                    return rows
                rows.append(row)
                budget_rows -= row.cost
                budget_tokens -= row.cost * row.layout.length
        return rows

    def _run_isolated(self, rows: list[Row]) -> int:
        """Forward the rows; if that raises, each job's rows alone, so a failure stays with its job."""
        try:
            outputs = forward_rows(self.model, rows, self.mask_id)
        except Exception:
            jobs = list(dict.fromkeys(r.owner for r in rows))
            if len(jobs) == 1:
                log.exception("scoring request %s failed", jobs[0].request_id)
                jobs[0].error = "internal error while scoring"
                return 0
            return sum(self._run_isolated([r for r in rows if r.owner is job]) for job in jobs)
        for row, out in zip(rows, outputs, strict=True):
            row.owner.forwards += row.cost
            row.owner.fold(row, out)
        return sum(r.cost for r in rows)


def _send(sink: ScoringSink, event: ScoringEvent) -> None:
    try:
        sink(event)
    except Exception:  # a consumer's failure must not stop the engine
        log.exception("event consumer failed for scoring request %s", event.request_id)
