"""ASGI middleware that guards every request before any route code runs.

* ``RequestIdMiddleware``: every response carries ``x-request-id`` (the client's when it sent a sane
  one, else a new one); the id is in a context variable that ``RequestIdFilter`` adds to every log
  record written while the request runs, so a client's id can be found in the server log.
* ``BodyLimitMiddleware``: a request body larger than ``--max-request-bytes`` is answered 413 before
  it is parsed: at once from ``Content-Length``, else as soon as the bytes read exceed the limit
  (chunked uploads). The body is read here and replayed to the app, so the route sees it unchanged.
* ``JsonOnlyMiddleware``: a POST must say ``Content-Type: application/json`` (415 otherwise). A
  browser sends ``text/plain`` cross-origin without a CORS preflight; requiring JSON makes every
  cross-site POST need one, which ``--allowed-origins`` alone can grant.

Errors here have OpenAI's body, like every other error of the server.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dllm_serve.server.errors import APIError

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


async def _send_error(send: Send, error: APIError, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    response = error.response()
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": [*response.raw_headers, *extra],
        }
    )
    await send({"type": "http.response.body", "body": response.body})


class RequestIdMiddleware:
    """Sets ``x-request-id`` on the response and ``current_request_id`` for the request's log lines."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = (_header(scope, REQUEST_ID_HEADER) or b"").decode("latin-1")
        request_id = given if _SANE_ID.fullmatch(given) else f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        token = current_request_id.set(request_id)
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers", []) if h[0].lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.debug(
                "%s %s -> %s in %.3fs", scope["method"], scope["path"], status, time.perf_counter() - started
            )
            current_request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Gives each record a ``request_id`` attribute ('-' outside a request) for the log format."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get() or "-"
        return True


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def log_request_ids() -> None:
    """Add the request id to every line the root logger's handlers write (``serve`` calls this once)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(logging.Formatter(LOG_FORMAT))


class BodyLimitMiddleware:
    """413 for bodies over ``limit`` bytes, decided before the app parses anything.

    The rest of an oversized body is read and dropped (up to ``DISCARD_CAP`` bytes) before the
    answer: a server that closes a connection with unread bytes makes the client's TCP stack
    discard the answer (a reset instead of the 413). A client that sent ``Expect: 100-continue``
    never sends the body at all.
    """

    DISCARD_CAP = 256 * 1024 * 1024

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            if int(declared) <= self.DISCARD_CAP and _header(scope, b"expect") != b"100-continue":
                await self._discard(receive, 0)
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                chunks.clear()
                if message.get("more_body", False):
                    await self._discard(receive, size)
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        chunks.clear()
        replayed = False

        async def replay() -> Message:
            nonlocal replayed, body
            if not replayed:
                replayed = True
                message, body = {"type": "http.request", "body": body, "more_body": False}, b""
                return message
            return await receive()  # after the body: the disconnect, for the routes that watch it

        await self.app(scope, replay, send)

    async def _discard(self, receive: Receive, size: int) -> None:
        while size <= self.DISCARD_CAP:
            message = await receive()
            size += len(message.get("body", b""))
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return

    async def _refuse(self, send: Send) -> None:
        error = APIError(
            413,
            f"The request body is larger than this server's limit of {self.limit} bytes "
            "(--max-request-bytes).",
            code="request_too_large",
        )
        await _send_error(send, error, ((b"connection", b"close"),))


class JsonOnlyMiddleware:
    """415 for a POST whose Content-Type is not application/json (any charset parameter is fine)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            kind = (_header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
            if kind != b"application/json":
                shown = kind.decode("latin-1") or "none"
                await _send_error(
                    send,
                    APIError(
                        415,
                        f"Content-Type must be application/json (got {shown}).",
                        code="unsupported_media_type",
                    ),
                )
                return
        await self.app(scope, receive, send)
