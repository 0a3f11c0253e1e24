"""Request lifecycle: from a prepared request to finished choices (or scores), on the asyncio loop.

* ``EngineStream`` submits one engine request at once (so a full queue is a 429 before any response
  starts) and yields its events; closing it early aborts the request, which the engine retires
  within one iteration, freeing its cache.
* ``run_choice`` consumes one choice's events into text (``ChoiceText``) and an outcome.
* ``GenerationRun`` is one HTTP generation in flight: every choice submitted (all or none), timing
  and metrics, and ``close`` which aborts whatever still runs exactly once. ``complete`` waits for
  all choices, unless the client disconnects (499), the request times out (504) or the engine
  fails a choice (500/503). Streaming responses drive the same run from ``streaming.py``.
* ``score`` does the same for likelihood scoring jobs (``scoring_routes.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request

from dllm_serve.engine.denoise import DenoiseStep
from dllm_serve.engine.engine import EngineBase
from dllm_serve.engine.scheduler import QueueFullError
from dllm_serve.engine.scoring import AnyRequest, ScoringEvent
from dllm_serve.engine.sequence import GenerationRequest, SequenceEvent, TokenLogprob
from dllm_serve.protocol_responses import diffusion_dict, usage_dict
from dllm_serve.server.choice_text import ChoiceText, Decoder
from dllm_serve.server.errors import SERVER_ERROR, APIError, internal_error

if TYPE_CHECKING:
    from dllm_serve.server.preparation import Prepared
    from dllm_serve.server.state import ServerState

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"  # a full queue drains quickly: one engine iteration frees slots

# (choice index, text delta, log-probabilities of the tokens since the last delta)
Emit = Callable[[int, str, list[TokenLogprob] | None], None]


# ------------------------------------------------------------------------------ errors


class EngineFailure(Exception):
    """A choice the engine ended with "error" or "abort" (shutdown); mapped to 500/503."""

    def __init__(self, reason: str, detail: str | None) -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail


def failure_error(exc: EngineFailure) -> APIError:
    """The client's answer to an engine failure: 503 for a shutdown abort, else a bare 500."""
    if exc.reason == "abort":
        return APIError(
            503, "The request was cancelled: the server is shutting down.", type=SERVER_ERROR, code="aborted"
        )
    log.warning("engine failed a request: %s", exc.detail)
    return internal_error()


def timeout_error(seconds: float) -> APIError:
    return APIError(
        504, f"The request did not finish within {seconds:g} seconds.", type=SERVER_ERROR, code="timeout"
    )


def queue_full_error(state: ServerState) -> APIError:
    """503 while draining (the engine refuses new work), else 429 with ``Retry-After``."""
    if state.status == "draining":
        return APIError(503, "The server is shutting down.", type=SERVER_ERROR, code="service_unavailable")
    state.metrics.http_errors.labels(status="429").inc()
    return APIError(
        429,
        f"The server's queue is full ({state.config.engine.max_queue} waiting requests); retry later.",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": RETRY_AFTER_S},
    )


# ------------------------------------------------------------------------------ one choice


class EngineStream:
    """One engine request's events on the asyncio loop.

    ``add_request`` runs in the constructor and raises ``QueueFullError`` when the queue is full.
    """

    def __init__(self, engine: EngineBase, request: GenerationRequest) -> None:
        self.engine = engine
        self.request_id = request.request_id
        self.finished = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[SequenceEvent] = asyncio.Queue()
        engine.add_request(request, self._on_event)

    def _on_event(self, event: SequenceEvent) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def events(self) -> AsyncIterator[SequenceEvent]:
        while not self.finished:
            event = await self._queue.get()
            self.finished = event.finished
            yield event

    def abort(self) -> None:
        if not self.finished:
            self.engine.abort(self.request_id)

    async def abort_and_wait(self, timeout: float = 2.0) -> SequenceEvent | None:
        """Abort, then wait (briefly: one engine iteration) for the final event, which counts forwards."""
        self.abort()

        async def final() -> SequenceEvent | None:
            async for event in self.events():
                if event.finished:
                    return event
            return None

        with contextlib.suppress(asyncio.TimeoutError):
            return await asyncio.wait_for(final(), timeout)
        return None


@dataclass
class ChoiceOutcome:
    index: int
    text: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int
    forwards: int
    logprobs: list[TokenLogprob] | None = None  # one per returned token, when asked


async def run_choice(
    index: int,
    stream: EngineStream,
    text: ChoiceText,
    emit: Emit | None = None,
    on_tokens: Callable[[], None] | None = None,
    on_denoise: Callable[[int, DenoiseStep], None] | None = None,
) -> ChoiceOutcome:
    """Consume one engine request to its end; ``emit(index, delta, logprobs)`` gets text as it
    becomes final, with the log-probabilities (when asked) of the tokens received since the last
    delta (their text may still be held back: a possible stop string, an incomplete character);
    ``on_denoise(index, step)`` gets each engine step of a request that traces them.

    Leaving early (cancelled, stop string) aborts the engine request.
    """
    forwards = 0
    entries: list[TokenLogprob] | None = None  # tokens accepted by ``text`` (up to a stop string)
    sent = 0

    def push(delta: str, last: bool = False) -> None:
        nonlocal sent
        if emit is None:
            return
        chunk = entries[sent:] if entries is not None else None
        if delta or (last and chunk):
            emit(index, delta, chunk)
            sent = len(entries) if entries is not None else 0

    def outcome(reason: str, stopped_on_token: bool = False) -> ChoiceOutcome:
        return ChoiceOutcome(
            index, text.text[: text.sent], reason, text.completion_tokens(stopped_on_token), forwards, entries
        )

    try:
        async for event in stream.events():
            if event.denoise is not None and on_denoise is not None:
                on_denoise(index, event.denoise)
            if event.token_ids and on_tokens is not None:
                on_tokens()
            forwards = max(forwards, event.forwards)
            before = len(text.token_ids)
            delta = text.add(event.token_ids)
            if event.logprobs is not None:
                entries = (entries or []) + event.logprobs[: len(text.token_ids) - before]
            push(delta)
            if text.stop_hit is not None:
                push("", last=True)
                final = await stream.abort_and_wait()
                if final is not None:
                    forwards = max(forwards, final.forwards)
                return outcome("stop")
            if event.finished:
                if event.finish_reason not in ("stop", "length"):
                    raise EngineFailure(event.finish_reason or "error", event.error)
                push(text.finish(), last=True)
                return outcome(event.finish_reason, event.stopped_on_token)
        raise EngineFailure("error", "event stream ended without a final event")
    finally:
        stream.abort()


# ------------------------------------------------------------------------------ one HTTP generation


def submit(state: ServerState, engine: EngineBase, prepared: Prepared) -> list[EngineStream]:
    """One engine request per choice; all or none (a full queue is a 429 before anything starts)."""
    streams: list[EngineStream] = []
    try:
        for r in prepared.requests:
            streams.append(EngineStream(engine, r))
    except QueueFullError:
        for s in streams:
            s.abort()
        raise queue_full_error(state) from None
    return streams


class GenerationRun:
    """One HTTP generation in flight: choices, timing and metrics."""

    def __init__(self, state: ServerState, engine: EngineBase, prepared: Prepared) -> None:
        self.state = state
        self.engine = engine
        self.prepared = prepared
        self.tokenizer: Decoder = engine.loaded.tokenizer
        self.arrived = time.perf_counter()
        self.first_token: float | None = None
        self.outcomes: dict[int, ChoiceOutcome] = {}
        self.streams: list[EngineStream] = []
        self.closed = False
        self.end_reason = "abort"  # for choices that never finished (disconnect, timeout, error)

    def on_tokens(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
            self.state.metrics.ttft.observe(self.first_token - self.arrived)

    def deadline(self) -> float | None:
        timeout = self.state.config.request_timeout
        return None if not timeout else self.arrived + timeout

    def timeout_error(self) -> APIError:
        return timeout_error(self.state.config.request_timeout or 0.0)

    def choice_tasks(
        self, emit: Emit | None = None, on_denoise: Callable[[int, DenoiseStep], None] | None = None
    ) -> list[asyncio.Task[ChoiceOutcome]]:
        """Submit every choice (429 when the queue is full) and start consuming each."""
        self.streams = submit(self.state, self.engine, self.prepared)
        self.state.metrics.prompt_tokens.inc(sum(len(p) for p in self.prepared.prompts))
        return [
            asyncio.create_task(
                run_choice(
                    i, s, ChoiceText(self.tokenizer, self.prepared.stop), emit, self.on_tokens, on_denoise
                )
            )
            for i, s in enumerate(self.streams)
        ]

    def close(self, tasks: list[asyncio.Task[ChoiceOutcome]]) -> None:
        """Cancel what still runs, abort its engine requests, record metrics (once)."""
        if self.closed:
            return
        self.closed = True
        for t in tasks:
            t.cancel()
        for s in self.streams:
            s.abort()
        m = self.state.metrics
        for o in self.outcomes.values():
            m.observe_choice(o.finish_reason, o.completion_tokens, o.forwards)
        for _ in range(len(self.streams) - len(self.outcomes)):
            m.finished.labels(reason=self.end_reason).inc()
        m.e2e.observe(time.perf_counter() - self.arrived)

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.prepared.prompts)
        return usage_dict(prompt, sum(o.completion_tokens for o in self.outcomes.values()))

    def diffusion(self) -> dict[str, Any]:
        return diffusion_dict(
            self.prepared.algorithm,
            sum(o.forwards for o in self.outcomes.values()),
            sum(o.completion_tokens for o in self.outcomes.values()),
        )


async def watch_disconnect(request: Request) -> None:
    """Returns when the client has gone (the request body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def complete(request: Request, run: GenerationRun) -> list[ChoiceOutcome]:
    """All choices, unless the client leaves, the request times out or the engine fails one."""
    tasks = run.choice_tasks()
    watcher = asyncio.create_task(watch_disconnect(request))
    try:
        deadline = run.deadline()
        pending: set[asyncio.Future[Any]] = {*tasks, watcher}
        while any(not t.done() for t in tasks):
            timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
            done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                run.end_reason = "timeout"
                raise run.timeout_error()
            if watcher in done:
                log.debug("%s: client disconnected", run.prepared.request_id)
                raise APIError(499, "client disconnected")
            for t in done:
                exc = t.exception()
                if isinstance(exc, EngineFailure):
                    run.end_reason = "error" if exc.reason != "abort" else "abort"
                    raise failure_error(exc)
                if exc is not None:
                    run.end_reason = "error"
                    raise exc
                outcome = t.result()
                run.outcomes[outcome.index] = outcome
        return [run.outcomes[i] for i in range(len(tasks))]
    finally:
        watcher.cancel()
        run.close(tasks)


# ------------------------------------------------------------------------------ scoring


class ScoringCall:
    """Engine scoring requests of one HTTP call, bridged to asyncio futures."""

    def __init__(self, engine: EngineBase, requests: Sequence[AnyRequest]) -> None:
        self.engine = engine
        self.ids = [r.request_id for r in requests]
        loop = asyncio.get_running_loop()
        self.futures: list[asyncio.Future[ScoringEvent]] = [loop.create_future() for _ in requests]
        try:
            for r, fut in zip(requests, self.futures, strict=True):
                engine.add_scoring(r, functools.partial(_deliver, loop, fut))
        except QueueFullError:
            self.abort()
            raise

    def abort(self) -> None:
        for rid, fut in zip(self.ids, self.futures, strict=True):
            if not fut.done():
                self.engine.abort(rid)


def _deliver(
    loop: asyncio.AbstractEventLoop, fut: asyncio.Future[ScoringEvent], event: ScoringEvent
) -> None:  # engine thread
    loop.call_soon_threadsafe(_resolve, fut, event)


def _resolve(fut: asyncio.Future[ScoringEvent], event: ScoringEvent) -> None:
    if not fut.done():
        fut.set_result(event)


async def score(
    request: Request, state: ServerState, engine: EngineBase, requests: Sequence[AnyRequest]
) -> list[ScoringEvent]:
    """Run the scoring requests; 429 when the queue is full, 499/504/500 as for generation."""
    arrived = time.perf_counter()
    try:
        call = ScoringCall(engine, requests)
    except QueueFullError:
        raise queue_full_error(state) from None
    watcher = asyncio.create_task(watch_disconnect(request))
    timeout = state.config.request_timeout
    deadline = None if not timeout else time.perf_counter() + timeout
    try:
        pending: set[asyncio.Future[Any]] = {*call.futures, watcher}
        while any(not f.done() for f in call.futures):
            left = None if deadline is None else max(0.0, deadline - time.perf_counter())
            done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise timeout_error(timeout or 0.0)
            if watcher in done:
                raise APIError(499, "client disconnected")
        events = [f.result() for f in call.futures]
    finally:
        watcher.cancel()
        call.abort()
    state.metrics.observe_scoring(events, time.perf_counter() - arrived)
    for event in events:
        if event.finish_reason != "stop":
            raise failure_error(EngineFailure(event.finish_reason, event.error or ""))
    return events
