"""The engine API over a checkpoint's own ``generate`` (``--trust-remote-code``).

A remote ``generate`` owns its whole decoding loop, so nothing can be batched or streamed: each
request is one call, made on this engine's worker thread (never on the asyncio event loop), one
request at a time, in arrival order. Its tokens arrive as the request's single final event, with
``forwards`` = the nfe the call reported. A waiting request can be aborted; a running call cannot
be interrupted, so an aborted one's result is dropped when it returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from dllm_serve.config import EngineConfig
from dllm_serve.engine.engine import EngineBase, EngineStats, RequestResult
from dllm_serve.engine.runner import StepInfo
from dllm_serve.engine.scheduler import QueueFullError
from dllm_serve.engine.sequence import GenerationRequest, SequenceEvent
from dllm_serve.models import remote_code
from dllm_serve.models.loader import LoadedModel

log = logging.getLogger(__name__)

OnEvent = Callable[[SequenceEvent], None]


class RemoteEngine(EngineBase):
    thread_name = "dllm-remote-engine"

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        if not isinstance(loaded.model, remote_code.RemoteModel):
            raise TypeError("RemoteEngine serves models loaded by remote_code.load_remote_model")
        super().__init__(loaded, config)
        self.model: remote_code.RemoteModel = loaded.model
        self.stop_ids = self.model.stop_ids
        self._cond = threading.Condition()
        self._waiting: deque[tuple[GenerationRequest, OnEvent]] = deque()
        self._aborted: set[str] = set()
        self._running: str | None = None

    # -- any thread -------------------------------------------------------------------------

    def add_request(self, request: GenerationRequest, on_event: OnEvent) -> None:
        """Queue a request; ``on_event`` gets its one final event on the worker thread."""
        with self._cond:
            if self._draining:
                raise QueueFullError("the server is shutting down")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append((request, on_event))
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        """A waiting request ends with "abort" unrun; a running one's result is dropped."""
        with self._cond:
            if self._running == request_id or any(r.request_id == request_id for r, _ in self._waiting):
                self._aborted.add(request_id)

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(
                len(self._waiting), int(self._running is not None), self.finished, self.forwards, self.steps
            )

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Refuse new work, let queued calls finish (up to the timeout), abort the rest."""
        with self._cond:
            self._draining = True
        deadline = time.monotonic() + drain_timeout
        while self.is_running and time.monotonic() < deadline:
            with self._cond:
                if not self._waiting and self._running is None:
                    break
            time.sleep(0.01)
        with self._cond:
            self._stop.set()
            left = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for request, on_event in left:
            on_event(SequenceEvent(request.request_id, [], "abort", prompt_tokens=len(request.prompt_ids)))
        if self._thread is not None:
            self._thread.join(timeout=10)  # a call still running is left to its daemon thread

    # -- worker thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                request, on_event = self._waiting.popleft()
                self._running = request.request_id
            try:
                event = self._run(request)
            finally:
                with self._cond:
                    self._running = None
                    self._aborted.discard(request.request_id)
            try:
                on_event(event)
            except Exception:  # a listener's bug must not stop the engine
                log.exception("event callback failed for request %s", request.request_id)

    def _run(self, request: GenerationRequest) -> SequenceEvent:
        """One call of the model's own generate, as the request's final event."""
        rid, prompt_tokens = request.request_id, len(request.prompt_ids)
        if rid in self._aborted:
            return SequenceEvent(rid, [], "abort", prompt_tokens=prompt_tokens)
        start = time.perf_counter()
        try:
            ids, nfe = remote_code.generate(
                self.model, request.prompt_ids, request.params, request.max_new_tokens
            )
        except Exception:
            log.exception("the checkpoint's generate() failed on request %s", rid)
            return SequenceEvent(rid, [], "error", error="the model's own generate() failed")
        self.forwards += nfe
        self.steps += 1
        self.finished += 1
        info = StepInfo(1, nfe, 0, len(ids), 1, time.perf_counter() - start)
        for observer in self.step_observers:
            observer(info)
        if rid in self._aborted:
            return SequenceEvent(rid, [], "abort", forwards=nfe, prompt_tokens=prompt_tokens)
        stopped = bool(ids) and ids[-1] in self.model.stop_ids
        # Shorter than asked without a stop token: generate ended the answer itself.
        reason = "stop" if stopped or len(ids) < request.max_new_tokens else "length"
        tokens = ids[:-1] if stopped else ids
        return SequenceEvent(rid, tokens, reason, stopped, forwards=nfe, prompt_tokens=prompt_tokens)

    # -- offline ------------------------------------------------------------------------------

    def run_to_completion(self, requests: Iterable[GenerationRequest]) -> dict[str, RequestResult]:
        """Run requests one after another on the caller's thread (CLI generate/eval, tests)."""
        if self.is_running:
            raise RuntimeError("run_to_completion needs the worker thread to be stopped")
        results: dict[str, RequestResult] = {}
        for request in requests:
            result = results[request.request_id] = RequestResult([], "", False, 0)
            result.add(self._run(request))
        return results
