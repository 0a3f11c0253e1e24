"""Continuous batching: requests join the running batch between iterations and leave at once.

Each iteration: apply aborts, admit waiting requests while there is room (batch size, token
budget, KV memory), run one runner step, deliver events, retire finished sequences and free their
KV extents. Only ``submit``/``abort``/``counts``/``wake`` are called from other threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from dllm_serve.config import EngineConfig
from dllm_serve.engine import faults
from dllm_serve.engine.runner import Runner, StepInfo
from dllm_serve.engine.scoring import ScoringQueue
from dllm_serve.engine.sequence import GenerationRequest, Sequence, SequenceEvent, canvas_length

log = logging.getLogger(__name__)

EventSink = Callable[[SequenceEvent], None]


LOOP_ERROR = "internal error in the engine loop"


class QueueFullError(RuntimeError):
    """The waiting queue is at --max-queue (the server answers 429)."""


@dataclass
class _Waiting:
    request: GenerationRequest
    sink: EventSink
    arrived: float


class Scheduler:
    def __init__(self, runner: Runner, config: EngineConfig) -> None:
        self.runner = runner
        self.config = config
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._waiting: deque[_Waiting] = deque()
        self._aborts: set[str] = set()
        self._running: list[Sequence] = []
        self._sinks: dict[str, EventSink] = {}
        self._faults = faults.enabled()
        # Likelihood scoring jobs: stepped by the engine after each generation step, same lock.
        self.scoring = ScoringQueue(runner.model, config, self._work)

    # -- any thread -----------------------------------------------------------------------------

    def submit(
        self, request: GenerationRequest, sink: EventSink, *, ignore_queue_limit: bool = False
    ) -> None:
        with self._work:
            if not ignore_queue_limit and len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(f"the server's queue is full ({self.config.max_queue} waiting requests)")
            self._waiting.append(_Waiting(request, sink, time.monotonic()))
            self._work.notify()

    def abort(self, request_id: str) -> None:
        with self._work:
            self._aborts.add(request_id)
            self._work.notify()

    def abort_all(self) -> None:
        with self._work:
            self._aborts.update(w.request.request_id for w in self._waiting)
            self._aborts.update(s.request.request_id for s in self._running)
        self._apply_aborts()
        self.scoring.abort_all()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            waiting, running = self.scoring.counts()
            return len(self._waiting) + waiting, len(self._running) + running

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self.scoring.pending())

    def wake(self) -> None:
        with self._work:
            self._work.notify_all()

    def wait_for_work(self, timeout: float) -> None:
        with self._work:
            if not (self._waiting or self._aborts or self.scoring.pending()):
                self._work.wait(timeout)

    # -- engine thread --------------------------------------------------------------------------

    def step(self) -> StepInfo | None:
        """One iteration; None when there is nothing to run."""
        self._apply_aborts()
        self._wait_for_arrivals()
        self._admit()
        if not self._running:
            return None
        faults.hit(self._faults, "engine-step")
        info = self.runner.step(self._running)
        for seq in self._running:
            self._deliver(seq)
        self._retire()
        return info

    def _wait_for_arrivals(self) -> None:
        """--max-wait-time: before starting an idle engine, let a batch gather (old batch server)."""
        wait = self.config.max_wait_time
        if wait <= 0 or self._running:
            return
        with self._work:
            if not self._waiting:
                return
            deadline = self._waiting[0].arrived + wait
            while len(self._waiting) < self.config.max_batch_size and time.monotonic() < deadline:
                self._work.wait(max(0.0, deadline - time.monotonic()))

    def _admit(self) -> None:
        """FIFO admission: the head of the queue is admitted once its KV memory (and the running
        batch's token budget) is free; nothing behind it overtakes it, so no request starves
        behind smaller ones, and the running batch drains towards it."""
        budget = self.config.max_num_tokens - sum(s.length for s in self._running)
        while len(self._running) < self.config.max_batch_size:
            with self._lock:
                if not self._waiting:
                    return
                head = self._waiting[0]
                try:
                    self.runner.check(head.request)
                    need = canvas_length(len(head.request.prompt_ids), head.request.params)
                    if (self._running and need > budget) or not self.runner.can_admit(head.request):
                        return
                    error = None
                except ValueError as exc:
                    error = str(exc)
                self._waiting.popleft()
            if error is not None:
                self._send(head.sink, SequenceEvent(head.request.request_id, [], "error", error=error))
                continue
            try:
                seq = self.runner.new_sequence(head.request)
            except Exception:  # not the request's fault: fail it, and let the loop count the failure
                self._send(head.sink, SequenceEvent(head.request.request_id, [], "error", error=LOOP_ERROR))
                raise
            budget -= seq.length
            self._sinks[seq.request.request_id] = head.sink
            self._running.append(seq)

    def fail_running(self, message: str) -> None:
        """After an engine-loop failure outside any one request: end every running sequence with
        an error (their state may be half-updated) and free their KV memory."""
        for seq in self._running:
            if not seq.finished:
                seq.error = message
                seq.finish_reason = "error"
                seq.push(
                    SequenceEvent(
                        seq.request.request_id, [], "error", error=message, prompt_tokens=seq.prompt_len
                    )
                )
            self._deliver(seq)
        self._retire()

    def fail_all(self, message: str) -> None:
        """The engine has stopped for good: fail running and waiting requests alike."""
        self.fail_running(message)
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for w in waiting:
            self._send(w.sink, SequenceEvent(w.request.request_id, [], "error", error=message))

    def _apply_aborts(self) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            if not aborts:
                return
            dropped = [w for w in self._waiting if w.request.request_id in aborts]
            self._waiting = deque(w for w in self._waiting if w.request.request_id not in aborts)
        for w in dropped:
            self._send(w.sink, SequenceEvent(w.request.request_id, [], "abort"))
        for seq in self._running:
            if seq.request.request_id in aborts and not seq.finished:
                seq.cancelled = True
                seq.finish_reason = "abort"
                seq.push(
                    SequenceEvent(
                        seq.request.request_id,
                        [],
                        "abort",
                        forwards=seq.forwards,
                        prompt_tokens=seq.prompt_len,
                    )
                )
                self._deliver(seq)
        self._retire()

    def _deliver(self, seq: Sequence) -> None:
        sink = self._sinks.get(seq.request.request_id)
        for event in seq.pop_events():
            if sink is not None:
                self._send(sink, event)

    def _retire(self) -> None:
        done = [s for s in self._running if s.finished]
        if not done:
            return
        for seq in done:
            self.runner.release(seq)
            self._sinks.pop(seq.request.request_id, None)
        with self._lock:
            self._running = [s for s in self._running if not s.finished]

    @staticmethod
    def _send(sink: EventSink, event: SequenceEvent) -> None:
        try:
            sink(event)
        except Exception:  # a consumer's failure must not stop the engine
            log.exception("event consumer failed for request %s", event.request_id)
