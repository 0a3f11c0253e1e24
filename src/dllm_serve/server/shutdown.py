"""Bounded shutdown: drain for at most ``--drain-timeout`` seconds, then end what still runs.

uvicorn on its own closes the listening socket first (so ``/health`` can never say ``draining``)
and then waits for every open connection before the app's shutdown even starts, however long the
requests take. Here the signal starts the drain instead, while the listener stays open:

1. ``/health`` says ``draining`` (503); new generation requests get 503; ``/health`` and
   ``/metrics`` keep answering.
2. Requests in flight (counted by ``InFlightMiddleware``) get up to ``drain_timeout`` seconds.
3. The engine stops; requests still running end with an OpenAI-shaped 503 (``aborted``), or an SSE
   error event when their stream has started; a few seconds are left for those answers to be sent.
4. Only then is uvicorn told to exit; it finds the connections idle and waits at most
   ``GRACEFUL_EXIT_S`` for stragglers. A second signal skips whatever is left of the drain.

The Ray Serve path runs the same ``drain`` from the app's shutdown (lifespan).
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

PROBE_PATHS = frozenset({"/health", "/metrics"})
ANSWER_GRACE_S = 5.0  # after the engine stops: time for the error answers to reach the clients
GRACEFUL_EXIT_S = 3  # uvicorn's own wait for connections, once everything has been answered


class InFlight:
    """How many requests (other than probes) the app is answering right now."""

    def __init__(self) -> None:
        self.count = 0
        self.hurry = False  # set by a second signal: stop waiting

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is in flight; False if ``timeout`` seconds pass first (or hurry)."""
        deadline = time.monotonic() + timeout
        while self.count and time.monotonic() < deadline and not self.hurry:
            await asyncio.sleep(0.05)
        return self.count == 0


class InFlightMiddleware:
    def __init__(self, app: ASGIApp, in_flight: InFlight) -> None:
        self.app = app
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        self.in_flight.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight.count -= 1


async def drain(state) -> None:
    """Steps 1-3 above for one app's ``ServerState``; runs once however often it is called."""
    if state.drain_task is None:
        state.drain_task = asyncio.ensure_future(_drain(state))
    await asyncio.shield(state.drain_task)


async def _drain(state) -> None:
    previous, state.status = state.status, "draining"
    timeout = state.config.drain_timeout
    if previous == "ready" and state.in_flight.count:
        log.info("draining %d running requests (up to %.0fs)", state.in_flight.count, timeout)
    if await state.in_flight.wait_idle(timeout):
        log.info("drained: no request in flight")
    else:
        log.warning("drain timeout (%.0fs): ending %d requests", timeout, state.in_flight.count)
    if state.engine is not None and state.owns_engine:
        await asyncio.to_thread(state.engine.shutdown, 0.0)  # ends what runs: each gets an abort event
    if not await state.in_flight.wait_idle(ANSWER_GRACE_S):
        log.warning("%d requests still open after the engine stopped", state.in_flight.count)


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM/SIGINT starting ``drain`` before uvicorn's own shutdown."""

    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signalled = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self._signalled or self.should_exit:
            self.state.in_flight.hurry = True  # a second signal: end what runs now, and exit
            super().handle_exit(sig, frame)
            return
        self._signalled = True
        self._captured_signals.append(sig)  # uvicorn re-raises it after exiting (status 143 / -15)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        async def drain_then_exit() -> None:
            try:
                await drain(self.state)
            finally:
                self.should_exit = True

        self._drain_runner = asyncio.ensure_future(drain_then_exit())
