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
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI
from starlette.middleware.cors import CORSMiddleware

from dllm_serve.config import ServerConfig
from dllm_serve.server.auth import require_api_key, resolve_api_key
from dllm_serve.server.errors import install_handlers
from dllm_serve.server.middleware import BodyLimitMiddleware, JsonOnlyMiddleware, RequestIdMiddleware
from dllm_serve.server.shutdown import InFlightMiddleware, drain
from dllm_serve.server.state import ServerState

log = logging.getLogger(__name__)


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
