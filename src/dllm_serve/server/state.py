"""Per-process server state (``app.state.server``): what the routes need, in one object.

Its own module so the route helpers (preparation, lifecycle, scoring) can name its type without
importing the app that includes them.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from dllm_serve.config import ServerConfig
from dllm_serve.server.errors import SERVER_ERROR, APIError
from dllm_serve.server.metrics import ServerMetrics
from dllm_serve.server.shutdown import InFlight

if TYPE_CHECKING:
    from dllm_serve.engine.base import EngineBase

PREPARE_THREADS = 4  # parsing, chat templates and tokenization of a few requests at once
T = TypeVar("T")


def served_model_id(config: ServerConfig) -> str:
    """--served-model-name, else the model directory's name (a hub id as given)."""
    if config.served_model_name:
        return config.served_model_name
    source = config.engine.dcp_path or config.engine.model_path
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve().name
    return str(source)


class ServerState:
    """What the routes need: the engine (once loaded), settings, metrics and lifecycle status."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.model_id = served_model_id(config)
        self.engine: EngineBase | None = None  # once loaded
        self.status = "loading"  # loading | ready | draining | failed
        self.load_error: BaseException | None = None
        self.metrics = ServerMetrics()
        self.on_load_failed: list[Callable[[BaseException], None]] = []
        self.owns_engine = False
        self.in_flight = InFlight()
        self.drain_task: asyncio.Future[None] | None = None
        # Request preparation (JSON, templates, tokenization) runs here, never on the event loop:
        # a multi-megabyte prompt must not hold up /health or other requests' streams.
        self.prepare_pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="dllm-prepare")

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the preparation threads (with this request's context: its log id)."""
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self.prepare_pool, call)

    def attach(self, engine: EngineBase) -> None:
        self.engine = engine
        engine.step_observers.append(self.metrics.observe_step)
        if not engine.is_running:
            engine.start()
        self.status = "ready"

    @property
    def max_model_len(self) -> int:
        assert self.engine is not None, "max_model_len is known once the engine is loaded"
        limit = int(self.engine.loaded.model.max_length)
        if self.config.engine.max_model_len:
            limit = min(limit, int(self.config.engine.max_model_len))
        return limit

    @property
    def engine_failure(self) -> str | None:
        """Why the engine stopped for good after repeated loop failures, else None."""
        return getattr(self.engine, "failure", None)

    def ready_engine(self) -> EngineBase:
        """The engine, or a 503 while loading, draining, after a failed load or a failed engine."""
        if self.status == "ready" and self.engine is not None:
            if self.engine_failure:
                raise APIError(
                    503,
                    "The engine has failed; see the server log.",
                    type=SERVER_ERROR,
                    code="service_unavailable",
                )
            return self.engine
        message = {
            "loading": "The model is still loading; retry shortly.",
            "draining": "The server is shutting down.",
            "failed": "The model failed to load; see the server log.",
        }.get(self.status, "The server is not ready.")
        raise APIError(503, message, type=SERVER_ERROR, code="service_unavailable")
