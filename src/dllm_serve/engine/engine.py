"""The engine: one loop on a dedicated thread; the server bridges its events to asyncio (server/routes.py).

Thread-safety: ``add_request`` and ``abort`` may be called from any thread; they only touch the
scheduler's locked inbox. Everything else runs on the engine thread (or, for offline use,
``run_to_completion`` drives the same loop on the caller's thread with no thread at all).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable

from dllm_serve.config import EngineConfig
from dllm_serve.engine.base import EngineBase, EngineStats, RequestResult
from dllm_serve.engine.runner import Runner
from dllm_serve.engine.scheduler import LOOP_ERROR, QueueFullError, Scheduler
from dllm_serve.engine.scoring import AnyRequest as AnyScoringRequest
from dllm_serve.engine.scoring import ScoringEvent
from dllm_serve.engine.sequence import GenerationRequest, SequenceEvent
from dllm_serve.models.loader import LoadedModel, load_model, resolve_model_path
from dllm_serve.models.registry import has_remote_code
from dllm_serve.threads import apply_threads

log = logging.getLogger(__name__)

MAX_LOOP_FAILURES = 5  # consecutive engine-loop failures before the engine is marked failed
LOOP_BACKOFF_S = 0.1  # first back-off after a loop failure; doubles with each further one

__all__ = [
    "Engine",
    "EngineBase",
    "EngineStats",
    "QueueFullError",
    "RequestResult",
    "build_engine",
]


class Engine(EngineBase):
    traces_denoise = True
    supports_logprobs = True

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        super().__init__(loaded, config)
        self.runner = Runner(loaded, self.config)
        self.scheduler = Scheduler(self.runner, self.config)
        self.stop_ids = self.runner.stop_ids

    # -- any thread -------------------------------------------------------------------------

    def add_request(self, request: GenerationRequest, on_event: Callable[[SequenceEvent], None]) -> None:
        """Queue a request; ``on_event`` is called on the engine thread for each event.

        Raises QueueFullError when ``max_queue`` requests are already waiting.
        """
        if self._draining:
            raise QueueFullError("the server is shutting down")
        self.scheduler.submit(request, on_event)

    def add_scoring(self, request: AnyScoringRequest, on_event: Callable[[ScoringEvent], None]) -> None:
        """Queue a likelihood scoring request (engine/scoring.py); ``on_event`` gets its one event.

        Raises QueueFullError like ``add_request``: scoring and generation share ``max_queue``.
        """
        if self._draining:
            raise QueueFullError("the server is shutting down")
        if self.scheduler.counts()[0] >= self.config.max_queue:
            raise QueueFullError(f"the server's queue is full ({self.config.max_queue} waiting requests)")
        self.scheduler.scoring.submit(request, on_event)

    def abort(self, request_id: str) -> None:
        """Cancel a request; it is retired (and its cache freed) within one iteration."""
        self.scheduler.abort(request_id)
        self.scheduler.scoring.abort(request_id)

    def stats(self) -> EngineStats:
        waiting, running = self.scheduler.counts()
        pool = self.runner.pool
        return EngineStats(
            waiting,
            running,
            self.finished,
            self.forwards,
            self.steps,
            pool.capacity,
            pool.used,
            pool.peak_used,
            pool.bytes_per_token,
            self.runner.prompt_cache.stats(),
        )

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting work, let running requests finish (up to the timeout), stop the thread."""
        self._draining = True
        deadline = time.monotonic() + drain_timeout
        while self.scheduler.has_work() and time.monotonic() < deadline and self.is_running:
            time.sleep(0.01)
        self._stop.set()
        self.scheduler.wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.scheduler.abort_all()

    # -- engine thread ------------------------------------------------------------------------

    def step(self) -> bool:
        """One iteration: admit, forward the running batch, commit, emit, retire. False if idle."""
        info = self.scheduler.step()
        scored = self.scheduler.scoring.step()
        if info is None and scored is None:
            return False
        self.steps += 1
        if scored is not None:
            self.forwards += scored.forwards
            self.finished += scored.finished
        if info is not None:
            self.forwards += info.forwards
            self.finished += info.finished
            for observer in self.step_observers:
                observer(info)
        return True

    def _loop(self) -> None:
        """Iterate until stopped. A failure outside any one request (the scheduler isolates those)
        fails the running requests, then backs off (0.1 s, doubling); after MAX_LOOP_FAILURES in a
        row without a good iteration the engine is marked failed and the thread ends."""
        failures = 0
        while not self._stop.is_set():
            try:
                worked = self.step()
            except Exception as exc:
                failures += 1
                if failures == 1:
                    log.exception("engine iteration failed; failing the running requests")
                else:
                    log.error("engine iteration failed again (%d in a row): %r", failures, exc)
                try:
                    self.scheduler.fail_running(LOOP_ERROR)
                except Exception:
                    log.exception("failing the running requests failed as well")
                    failures = MAX_LOOP_FAILURES
                if failures >= MAX_LOOP_FAILURES:
                    self.failure = f"the engine loop failed {failures} times in a row; last error: {exc!r}"
                    log.error("engine marked failed: %s", self.failure)
                    with contextlib.suppress(Exception):  # best effort: the engine is gone either way
                        self.scheduler.fail_all("the engine has failed; see the server log")
                    return
                self._stop.wait(LOOP_BACKOFF_S * 2 ** (failures - 1))
                continue
            if worked:
                failures = 0
            else:
                self.scheduler.wait_for_work(timeout=0.1)

    # -- offline ------------------------------------------------------------------------------

    def run_to_completion(
        self, requests: Iterable[GenerationRequest], step: Callable[[], bool] | None = None
    ) -> dict[str, RequestResult]:
        """Run requests on the caller's thread until all finish (CLI generate/eval, tests); each
        request's events folded into its ``RequestResult``. ``step`` (default ``self.step``) runs one
        iteration and says whether there was work: ``bench engine`` passes one that times it."""
        if self.is_running:
            raise RuntimeError("run_to_completion needs the engine thread to be stopped")
        results: dict[str, RequestResult] = {}

        def collect(event: SequenceEvent) -> None:
            results.setdefault(event.request_id, RequestResult([], "", False, 0)).add(event)

        pending = list(requests)
        ids = [r.request_id for r in pending]
        for request in pending:
            self.scheduler.submit(request, collect, ignore_queue_limit=True)
        iterate = step or self.step
        while iterate():
            pass
        return {rid: results[rid] for rid in ids}


def build_engine(config: EngineConfig) -> EngineBase:
    """Load the configured checkpoint (converting a DCP checkpoint first) and build its engine.

    With ``trust_remote_code`` a checkpoint that ships modeling code (``auto_map``) is served
    through that code (``RemoteEngine``); otherwise the native model is built, and a checkpoint of
    an unknown family is an error that says so.
    """
    apply_threads(config.threads)  # here: the process that runs the model (a Ray replica too)
    path = config.model_path
    if config.cuda_graphs and not config.resolved_device().startswith("cuda"):
        raise ValueError(f"--cuda-graphs needs a CUDA device, not {config.resolved_device()!r}")
    if config.dcp_path:
        from dllm_serve.checkpoints.dcp import ensure_converted

        if not config.base_model:
            raise ValueError("--dcp-path needs --base-model (config and tokenizer of the trained model)")
        path = str(ensure_converted(config.dcp_path, config.base_model, config.dcp_cache_dir))
    if config.trust_remote_code:
        resolved = resolve_model_path(path)
        if has_remote_code(json.loads((resolved / "config.json").read_text())):
            from dllm_serve.engine.remote import RemoteEngine
            from dllm_serve.models.remote_code import load_remote_model

            if config.load_format != "safetensors" or config.cuda_graphs:
                raise ValueError("--load-format dummy and --cuda-graphs apply to native models only")
            remote = load_remote_model(
                resolved,
                trust_remote_code=True,
                dtype=config.resolved_dtype(),
                device=config.resolved_device(),
            )
            return RemoteEngine(remote, config)
    loaded = load_model(
        path, dtype=config.resolved_dtype(), device=config.resolved_device(), load_format=config.load_format
    )
    return Engine(loaded, config)
