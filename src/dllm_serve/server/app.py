"""The FastAPI application: per-process state, engine lifecycle, routes and error handlers.

Everything a process needs lives on ``app.state.server`` (no module globals), so several apps can
live in one process and a Ray Serve replica can wrap this app unchanged. When no engine is given,
the lifespan starts loading it in a worker thread and returns at once: the server answers
``/health`` with 503 "loading" until the engine runs, then 200; on shutdown it drains
(``shutdown.drain``: "draining", at most ``--drain-timeout`` seconds) and stops the engine thread.

Middleware (outermost first): request ids, CORS (only with ``--allowed-origins``), the in-flight
count the drain waits on, the body-size limit, and the JSON content-type check.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Depends, FastAPI
from starlette.middleware.cors import CORSMiddleware

from dllm_serve.config import ServerConfig
from dllm_serve.server.auth import require_api_key, resolve_api_key
from dllm_serve.server.errors import SERVER_ERROR, APIError, install_handlers
from dllm_serve.server.metrics import ServerMetrics
from dllm_serve.server.middleware import BodyLimitMiddleware, JsonOnlyMiddleware, RequestIdMiddleware
from dllm_serve.server.shutdown import InFlight, InFlightMiddleware, drain

if TYPE_CHECKING:
    from dllm_serve.engine.engine import EngineBase

log = logging.getLogger(__name__)

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


async def _load(state: ServerState) -> None:
    import torch

    from dllm_serve.engine.engine import build_engine

    try:
        engine = await asyncio.to_thread(build_engine, state.config.engine)
    except Exception as exc:  # our messages name the file and cause; the traceback with --verbose
        first = (str(exc).strip().splitlines() or [""])[0]
        foreign = not isinstance(exc, (ValueError, OSError)) or not first  # e.g. a CUDA RuntimeError
        log.error("failed to load the model: %s", f"{type(exc).__name__}: {first}" if foreign else exc)
        log.debug("load failure traceback", exc_info=exc)
        state.status = "failed"
        state.load_error = exc
        for callback in state.on_load_failed:
            callback(exc)
        return
    if state.status == "draining":  # shut down while loading
        engine.shutdown(0)
        return
    state.attach(engine)
    log.info(
        "serving %s on http://%s:%d (default algorithm %s, %d torch threads)",
        state.model_id,
        state.config.host,
        state.config.port,
        engine.default_algorithm,
        torch.get_num_threads(),
    )


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
            await drain(state)  # already done when a signal started it (serve_single)
            if loader is not None and not loader.done():
                with contextlib.suppress(BaseException):
                    await loader
            state.prepare_pool.shutdown(wait=False, cancel_futures=True)

    # The OpenAPI schema is served below, behind the API key; the interactive docs are off.
    app = FastAPI(
        title="dllm-serve",
        description="OpenAI-compatible server for diffusion language models",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.server = state
    app.state.api_key = resolve_api_key(config.api_key)
    install_handlers(app)

    from dllm_serve.server.playground import mount_playground
    from dllm_serve.server.responses_api import responses
    from dllm_serve.server.routes import api, router
    from dllm_serve.server.scoring_routes import scoring_api

    app.include_router(router)
    app.include_router(api)
    app.include_router(scoring_api)
    mount_playground(app)
    app.include_router(responses)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_api_key)])
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    # add_middleware puts each one outside the previous: the last added runs first.
    app.add_middleware(JsonOnlyMiddleware)
    app.add_middleware(BodyLimitMiddleware, limit=config.max_request_bytes)
    app.add_middleware(InFlightMiddleware, in_flight=state.in_flight)
    if config.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.allowed_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-request-id"],
            expose_headers=["x-request-id", "retry-after"],
            max_age=600,
        )
    app.add_middleware(RequestIdMiddleware)
    return app
