"""The web playground at /playground: static files served by the server itself (no build step, no
network beyond this server), plus ``/playground/config.json`` saying whether the API needs a key,
so the page asks for one before its first API call instead of failing it.

The page is public; it calls the /v1 API with the key the user types (docs/playground.md).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static" / "playground"


def mount_playground(app: FastAPI) -> None:
    @app.api_route("/playground", methods=["GET", "HEAD"], include_in_schema=False)
    async def playground_root() -> RedirectResponse:
        return RedirectResponse("/playground/")

    @app.get("/playground/config.json", include_in_schema=False)
    async def playground_config(request: Request) -> JSONResponse:
        return JSONResponse({"api_key_required": request.app.state.api_key is not None})

    app.mount("/playground", StaticFiles(directory=STATIC, html=True), name="playground")
