"""The FastAPI application: per-process state, engine lifecycle, routes and error handlers.

Everything a process needs lives on ``app.state.server`` (no module globals), so several apps can
live in one process and a Ray Serve replica can wrap this app unchanged. When no engine is given,
the lifespan starts loading it in a worker thread and returns at once: the server answers
``/health`` with 503 "loading" until the engine runs, then 200; on shutdown it reports "draining"
(503), lets running requests finish and stops the engine thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI

from dllm_serve.config import ServerConfig
from dllm_serve.server.auth import resolve_api_key
from dllm_serve.server.errors import SERVER_ERROR, APIError, install_handlers
from dllm_serve.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 30.0


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
        self.engine = None  # dllm_serve.engine.engine.Engine once loaded
        self.status = "loading"  # loading | ready | draining | failed
        self.load_error: BaseException | None = None
        self.metrics = ServerMetrics()
        self.on_load_failed: list[Callable[[BaseException], None]] = []
        self.owns_engine = False

    def attach(self, engine) -> None:
        self.engine = engine
        engine.step_observers.append(self.metrics.observe_step)
        if not engine.is_running:
            engine.start()
        self.status = "ready"

    @property
    def max_model_len(self) -> int:
        limit = int(self.engine.loaded.model.max_length)
        if self.config.engine.max_model_len:
            limit = min(limit, int(self.config.engine.max_model_len))
        return limit

    def ready_engine(self):
        """The engine, or a 503 while loading, draining or after a failed load."""
        if self.status == "ready" and self.engine is not None:
            return self.engine
        message = {
            "loading": "The model is still loading; retry shortly.",
            "draining": "The server is shutting down.",
            "failed": "The model failed to load; see the server log.",
        }.get(self.status, "The server is not ready.")
        raise APIError(503, message, type=SERVER_ERROR, code="service_unavailable")


async def _load(state: ServerState) -> None:
    from dllm_serve.engine.engine import build_engine

    try:
        engine = await asyncio.to_thread(build_engine, state.config.engine)
    except Exception as exc:
        log.exception("failed to load the model")
        state.status = "failed"
        state.load_error = exc
        for callback in state.on_load_failed:
            callback(exc)
        return
    if state.status == "draining":  # shut down while loading
        engine.shutdown(0)
        return
    state.attach(engine)
    log.info("engine ready: model %s, default algorithm %s", state.model_id, engine.default_algorithm)


def create_app(config: ServerConfig, engine=None) -> FastAPI:
    """The OpenAI-compatible app; builds its engine from ``config.engine`` when none is given."""
    state = ServerState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None
        if engine is not None:
            state.attach(engine)
        else:
            state.owns_engine = True
            loader = asyncio.create_task(_load(state))
        try:
            yield
        finally:
            previous, state.status = state.status, "draining"
            if loader is not None and not loader.done():
                with contextlib.suppress(BaseException):
                    await loader
            if state.engine is not None and previous != "failed" and state.owns_engine:
                log.info("draining running requests (up to %.0fs)", DRAIN_TIMEOUT_S)
                await asyncio.to_thread(state.engine.shutdown, DRAIN_TIMEOUT_S)

    app = FastAPI(
        title="dllm-serve",
        description="OpenAI-compatible server for diffusion language models",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.server = state
    app.state.api_key = resolve_api_key(config.api_key)
    install_handlers(app)

    from dllm_serve.server.routes import api, router
    from dllm_serve.server.scoring_routes import scoring_api

    app.include_router(router)
    app.include_router(api)
    app.include_router(scoring_api)
    return app
