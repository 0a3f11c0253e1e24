"""Bearer API-key check for the /v1 API (``--api-key`` or ``DLLM_SERVE_API_KEY``).

The comparison is constant-time so response timing does not leak how much of a guess was right.
/health and /metrics stay open: load balancers and Prometheus probe them without credentials and
they reveal no prompts or outputs.
"""

from __future__ import annotations

import hmac
import os

from fastapi import Request

from dllm_serve.server.errors import INVALID_REQUEST, APIError

API_KEY_ENV = "DLLM_SERVE_API_KEY"


def resolve_api_key(configured: str | None) -> str | None:
    """The configured key, else the environment's; empty means no authentication."""
    key = configured if configured is not None else os.environ.get(API_KEY_ENV)
    return key or None


def _unauthorized(message: str) -> APIError:
    # OpenAI answers a bad key with 401, type invalid_request_error, code invalid_api_key.
    return APIError(
        401, message, type=INVALID_REQUEST, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
    )


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: pass when no key is set or the Bearer token matches."""
    expected: str | None = request.app.state.api_key
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized(
            "You didn't provide an API key. Send it in the Authorization header: 'Bearer YOUR_KEY'."
        )
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise _unauthorized("Incorrect API key provided.")
