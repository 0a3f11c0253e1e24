"""Likelihood scoring inside the engine loop: Monte-Carlo ELBO samples as batched forwards.

A ``ScoringRequest`` asks for log p(continuation | context). On the engine thread it becomes a
``ScoringJob`` holding its mask samples (``decoding/likelihood.py``) and, when asked, a greedy
check. Each engine iteration, after the generation step, ``ScoringQueue.step`` takes rows from
the jobs in arrival order (samples of many requests share one forward, up to ``max_batch_size``
rows and ``max_num_tokens`` tokens), runs one full-canvas forward without a KV cache, and folds
each row's log-probabilities back into its job. A job finishes with one ``ScoringEvent``.

Mask draws come from the request's own generator at the job's creation, rows are right-padded
and padding is masked out of attention, so a result depends on the seed only, not on what else
shares the forwards. Rows are laid out per family:

* full attention (LLaDA): ``[context | noisy continuation]``, every token sees every token;
* block diffusion (Nemotron, as trained): ``[context | clean continuation blocks 0..n-2 | noisy
  continuation]`` with repeated position ids; the context sees itself; a clean block sees the
  context and the clean blocks up to itself; a noisy block sees the context, the clean blocks
  before it and itself. Each block's masked tokens are thus predicted from the clean context and
  clean earlier blocks, as in training and in the ``nemotron`` preset's committed-context decoding.

With ``cfg_scale`` > 0 each row is forwarded twice, the second time with the context replaced by
mask tokens, and the logits are guided as in generation: uncond + (scale + 1) * (cond - uncond).
The greedy check (LLaDA's): from the fully masked continuation (block by block for block
diffusion), commit one token per forward, the most confident masked position's argmax; the
continuation is greedy when every committed token equals it (the check stops at the first miss).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dllm_serve.config import EngineConfig
from dllm_serve.decoding.likelihood import block_spans, combine, draw_masks, sample_value
from dllm_serve.models.base import DiffusionLM
from dllm_serve.tensors import upload

log = logging.getLogger(__name__)

# Token kinds in a scoring row; they decide what each query attends to.
CONTEXT, CLEAN, NOISY, PAD = 0, 1, 2, 3


@dataclass
class ScoringRequest:
    """What the server hands the engine. ``block_length`` None: full-attention layout (one block)."""

    request_id: str
    context_ids: list[int]
    continuation_ids: list[int]
    mc_num: int = 128
    cfg_scale: float = 0.0
    seed: int | None = None
    check_greedy: bool = False
    block_length: int | None = None
    shift_logits: bool = False


@dataclass
class ScoringEvent:
    """A scoring request's one event. ``finish_reason``: "stop" (scored), "abort" or "error"."""

    request_id: str
    finish_reason: str
    logprob: float | None = None
    stderr: float | None = None
    num_tokens: int = 0
    is_greedy: bool | None = None
    forwards: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return True


ScoringSink = Callable[[ScoringEvent], None]


@dataclass
class RowLayout:
    """One request's row without its noisy part: ids, position ids, token kinds, block ids, and
    for each continuation position the row index whose logits predict it."""

    ids: torch.Tensor
    positions: torch.Tensor
    kinds: torch.Tensor
    blocks: torch.Tensor
    predict: torch.Tensor
    noisy_start: int
    context_len: int
    full: bool

    @property
    def length(self) -> int:
        return self.ids.shape[0]


def row_layout(request: ScoringRequest, mask_id: int) -> RowLayout:
    """The row layout of the module docstring for ``request``."""
    ctx, cont = request.context_ids, request.continuation_ids
    c, n = len(ctx), len(cont)
    full = request.block_length is None
    spans = block_spans(n, request.block_length)
    clean = 0 if full else spans[-1][0]  # clean copies of every block but the last
    ids = torch.tensor(ctx + cont[:clean] + [mask_id] * n, dtype=torch.long)
    positions = torch.cat([torch.arange(c + clean), torch.arange(c, c + n)])
    kinds = torch.tensor([CONTEXT] * c + [CLEAN] * clean + [NOISY] * n, dtype=torch.long)
    block_of = torch.zeros(n, dtype=torch.long)
    for b, (s, e) in enumerate(spans):
        block_of[s:e] = b
    blocks = torch.cat([torch.full((c,), -1), block_of[:clean], block_of])
    noisy = c + clean
    predict = torch.arange(noisy, noisy + n)
    if request.shift_logits:  # position i is predicted by the logits at i - 1
        predict = predict - 1
        for s, _ in spans:  # a block's first token: the clean token before the block
            predict[s] = c + s - 1
    return RowLayout(ids, positions, kinds, blocks, predict, noisy, c, full)


def attention_masks(kinds: torch.Tensor, blocks: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """[B, T, T] query-key visibility for rows of the two layouts (see the module docstring)."""
    kq, kk = kinds[:, :, None], kinds[:, None, :]
    bq, bk = blocks[:, :, None], blocks[:, None, :]
    real_q, real_k = kq != PAD, kk != PAD
    see_context = real_q & (kk == CONTEXT)
    clean_q = (kq == CLEAN) & (kk == CLEAN) & (bk <= bq)
    noisy_q = (kq == NOISY) & (((kk == CLEAN) & (bk < bq)) | ((kk == NOISY) & (bk == bq)))
    block_rule = see_context | clean_q | noisy_q
    return torch.where(full[:, None, None], real_q & real_k, block_rule)


@dataclass
class ScoringJob:
    """One request's state on the engine thread."""

    request: ScoringRequest
    sink: ScoringSink
    layout: RowLayout
    masks: torch.Tensor
    weights: torch.Tensor
    counts: list[int]
    target: torch.Tensor
    values: list[float | None]
    next_sample: int = 0
    forwards: int = 0
    greedy: torch.Tensor | None = None  # the greedy check's continuation state (None: not asked or done)
    is_greedy: bool | None = None
    greedy_in_flight: bool = False
    error: str | None = None
    done: bool = False

    @classmethod
    def create(cls, request: ScoringRequest, sink: ScoringSink, mask_id: int) -> ScoringJob:
        seed = request.seed if request.seed is not None else secrets.randbits(62)
        generator = torch.Generator().manual_seed(seed)
        n = len(request.continuation_ids)
        samples = draw_masks(n, request.mc_num, request.block_length, generator)
        job = cls(
            request,
            sink,
            row_layout(request, mask_id),
            samples.masks,
            samples.weights,
            samples.counts.tolist(),
            torch.tensor(request.continuation_ids, dtype=torch.long),
            [None] * samples.masks.shape[0],
        )
        if request.check_greedy:
            job.greedy = torch.full((n,), mask_id, dtype=torch.long)
        return job

    @property
    def rows_per_sample(self) -> int:
        return 2 if self.request.cfg_scale > 0 else 1

    def finished(self) -> bool:
        return self.next_sample >= len(self.values) and self.greedy is None and not self.greedy_in_flight


@dataclass
class _Row:
    job: ScoringJob
    noisy: torch.Tensor  # [L] continuation with masks
    sample: int | None  # index into the job's samples; None for the greedy row


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
        self.device = next(model.parameters()).device
        self._cond = condition
        self._arrivals: deque[tuple[ScoringRequest, ScoringSink]] = deque()
        self._aborts: set[str] = set()
        self._jobs: list[ScoringJob] = []

    # -- any thread (callers hold no lock) ------------------------------------------------------

    def submit(self, request: ScoringRequest, sink: ScoringSink) -> None:
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
            _send(job.sink, ScoringEvent(job.request.request_id, "abort", forwards=job.forwards))
        self._jobs = []

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
                self._jobs.append(ScoringJob.create(request, sink, self.mask_id))
            except ValueError as exc:
                _send(sink, ScoringEvent(request.request_id, "error", error=str(exc)))
        for job in self._jobs:
            if job.request.request_id in aborts:
                job.done = True
                _send(job.sink, ScoringEvent(job.request.request_id, "abort", forwards=job.forwards))
        self._jobs = [j for j in self._jobs if not j.done]
        if not self._jobs:
            return None
        rows = self._take_rows()
        stats = ScoringStats(rows=len(rows))
        stats.forwards = self._run_isolated(rows)
        for job in self._jobs:
            if not job.done and (job.error is not None or job.finished()):
                self._finish(job)
                stats.finished += 1
        self._jobs = [j for j in self._jobs if not j.done]
        return stats

    def _take_rows(self) -> list[_Row]:
        """Rows for one forward, jobs in arrival order; each job's greedy row before its samples."""
        rows: list[_Row] = []
        budget_rows, budget_tokens = self.config.max_batch_size, self.config.max_num_tokens
        for job in self._jobs:
            cost, length = job.rows_per_sample, job.layout.length
            if job.greedy is not None and not job.greedy_in_flight:
                if rows and (cost > budget_rows or cost * length > budget_tokens):
                    break
                rows.append(_Row(job, job.greedy.clone(), None))
                job.greedy_in_flight = True
                budget_rows, budget_tokens = budget_rows - cost, budget_tokens - cost * length
            while job.next_sample < len(job.values):
                if rows and (cost > budget_rows or cost * length > budget_tokens):
                    return rows
                noisy = torch.where(job.masks[job.next_sample], self.mask_id, job.target)
                rows.append(_Row(job, noisy, job.next_sample))
                job.next_sample += 1
                budget_rows, budget_tokens = budget_rows - cost, budget_tokens - cost * length
        return rows

    def _run_isolated(self, rows: list[_Row]) -> int:
        """Forward the rows; if that raises, each job's rows alone, so a failure stays with its job."""
        try:
            return self._run(rows)
        except Exception:
            jobs = list(dict.fromkeys(r.job for r in rows))
            if len(jobs) == 1:
                log.exception("scoring request %s failed", jobs[0].request.request_id)
                jobs[0].error = "internal error while scoring"
                return 0
        return sum(self._run_isolated([r for r in rows if r.job is job]) for job in jobs)

    @torch.inference_mode()
    def _run(self, rows: list[_Row]) -> int:
        """One batched forward; folds each row's log-probabilities into its job. Returns forwards."""
        cond = len(rows)
        cfg = [i for i, r in enumerate(rows) if r.job.request.cfg_scale > 0]
        all_rows = rows + [rows[i] for i in cfg]
        n = len(all_rows)
        t = max(r.job.layout.length for r in rows)
        width = max(r.noisy.shape[0] for r in rows)
        ids = torch.full((n, t), self.mask_id, dtype=torch.long)
        positions = torch.zeros((n, t), dtype=torch.long)
        kinds = torch.full((n, t), PAD, dtype=torch.long)
        blocks = torch.zeros((n, t), dtype=torch.long)
        predict = torch.zeros((n, width), dtype=torch.long)
        targets = torch.zeros((n, width), dtype=torch.long)
        full = torch.zeros(n, dtype=torch.bool)
        for i, r in enumerate(all_rows):
            lay = r.job.layout
            size, cont = lay.length, r.noisy.shape[0]
            ids[i, :size] = lay.ids
            ids[i, lay.noisy_start : size] = r.noisy
            if i >= cond:  # classifier-free guidance: the context replaced by masks
                ids[i, : lay.context_len] = self.mask_id
            positions[i, :size] = lay.positions
            kinds[i, :size] = lay.kinds
            blocks[i, :size] = lay.blocks
            predict[i, :cont] = lay.predict
            targets[i, :cont] = r.job.target
            full[i] = lay.full
        packed = upload(
            torch.cat([ids, positions, kinds, blocks, predict, targets, full[:, None].long()], 1), self.device
        )
        ids, positions, kinds, blocks, predict, targets, full = packed.split([t, t, t, t, width, width, 1], 1)
        mask = attention_masks(kinds, blocks, full[:, 0].bool())
        logits = self.model.logits(self.model.hidden_states(ids, positions, mask, None, predict)).float()
        if cfg:
            uncond = logits[cond:]
            scale = upload([rows[i].job.request.cfg_scale for i in cfg], self.device, torch.float32)
            logits = logits[:cond].clone()
            logits[cfg] = uncond + (scale[:, None, None] + 1) * (logits[cfg] - uncond)
        logp = torch.log_softmax(logits, dim=-1)
        target_lp = logp.gather(-1, targets[:cond, :, None])[..., 0]
        top_lp, top_id = logp.max(dim=-1)
        # The forward's one device-to-host transfer.
        host = torch.stack([target_lp.double(), top_lp.double(), top_id.double()], 1).cpu()
        forwards = 0
        for r, out in zip(rows, host, strict=True):
            self._fold(r, out[:, : r.noisy.shape[0]])
            r.job.forwards += r.job.rows_per_sample
            forwards += r.job.rows_per_sample
        return forwards

    def _fold(self, row: _Row, out: torch.Tensor) -> None:
        """Record a sample's value, or advance the greedy check by one committed token."""
        job = row.job
        target_lp, top_lp, top_id = out[0], out[1], out[2].long()
        if row.sample is not None:
            masked = job.masks[row.sample]
            if not bool(torch.isfinite(target_lp[masked]).all()):
                job.error = "numerical error: the model produced NaN or infinite logits"
                return
            job.values[row.sample] = sample_value(job.weights[row.sample], target_lp)
            return
        job.greedy_in_flight = False
        state = job.greedy
        assert state is not None
        candidates = state == self.mask_id
        if not job.layout.full:  # block diffusion: the first block that still has masks
            for s, e in block_spans(state.shape[0], job.request.block_length):
                if bool(candidates[s:e].any()):
                    window = torch.zeros_like(candidates)
                    window[s:e] = True
                    candidates &= window
                    break
        pos = int(torch.where(candidates, top_lp, float("-inf")).argmax())
        if int(top_id[pos]) != int(job.target[pos]):
            job.is_greedy, job.greedy = False, None
            return
        state[pos] = job.target[pos]
        if not bool((state == self.mask_id).any()):
            job.is_greedy, job.greedy = True, None

    def _finish(self, job: ScoringJob) -> None:
        job.done = True
        rid = job.request.request_id
        if job.error is not None:
            _send(job.sink, ScoringEvent(rid, "error", forwards=job.forwards, error=job.error))
            return
        mean, stderr = combine([v for v in job.values if v is not None], job.counts)
        _send(
            job.sink,
            ScoringEvent(
                rid,
                "stop",
                logprob=mean,
                stderr=stderr,
                num_tokens=len(job.request.continuation_ids),
                is_greedy=job.is_greedy,
                forwards=job.forwards,
            ),
        )


def _send(sink: ScoringSink, event: ScoringEvent) -> None:
    try:
        sink(event)
    except Exception:  # a consumer's failure must not stop the engine
        log.exception("event consumer failed for scoring request %s", event.request_id)
