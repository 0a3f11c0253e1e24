"""The replicated server's HTTP entry: forward each request to a replica, retry, answer errors as OpenAI.

Ray Serve's proxy answers a request whose replica died with a plain-text ``Internal Server Error``
and cuts a stream without a word. So the application's ingress is this small ``Front`` deployment
(no resources, one replica) instead of the replicas themselves: it reads the request, hands it to a
replica through a deployment handle (``ReplicaServer.forward``, which runs the replica's own ASGI app
in process and streams its messages back), and passes the response on. When the replica fails:

* before anything with a token reached the client (a plain response not yet started; a stream that
  sent at most its preamble - chat's role chunk, the Responses API's opening events - which is held
  back until something else follows), the request is
  sent once more, to whichever replica Serve picks (Serve stops routing to a replica once a call
  to it has failed with the actor dead);
* if that fails too before anything reached the client, the answer is a 503 in OpenAI's shape;
* once tokens were streamed, the stream ends with an SSE ``error`` event and ``[DONE]``, as a
  single server does when an engine fails mid-stream.

A client that disconnects: Serve cancels the front's handler and, with it, the replica call it is
waiting on (Serve propagates cancellation to handle calls); the replica turns that into an
``http.disconnect`` for its app, so the engine aborts the request as on a single server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from dllm_serve.server.errors import SERVER_ERROR, error_body
from dllm_serve.server.streaming import SSE_DONE, sse

log = logging.getLogger(__name__)

RETRIES = 1  # a request that has sent no token is retried this many times on another replica
FAILED_MESSAGE = "The replica serving this request stopped; retry the request."
# Scope keys a replica's app needs; the rest (Serve's own, the proxy's state) stays behind.
SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "query_string", "root_path")


def request_scope(scope: dict[str, Any]) -> dict[str, Any]:
    """The picklable part of an HTTP scope, for the replica to rebuild its request from."""
    out = {k: scope[k] for k in SCOPE_KEYS if k in scope}
    out["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])]
    out["client"] = tuple(scope["client"]) if scope.get("client") else None
    out["server"] = tuple(scope["server"]) if scope.get("server") else None
    return out


async def run_asgi(app, scope: dict[str, Any], body: bytes) -> AsyncIterator[dict[str, Any]]:
    """Run ``app`` on one buffered request and yield the messages it sends (inside a replica).

    Closing the generator early (the front cancelled: client gone) tells the app the client
    disconnected, then waits for it to finish, so the engine request is aborted, not orphaned.
    """
    messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app({**scope, "state": {}}, receive, send)
        finally:
            await messages.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await messages.get()) is not None:
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                break
        await task  # the app's own exception, if any, reaches the front
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), 5.0)
            task.cancel()


# Responses API events sent before any text (OpenAI's event sequence opens with these).
RESPONSES_PREAMBLE = frozenset(
    {"response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"}
)
CHOICE_KEYS = frozenset({"id", "object", "created", "model", "choices", "usage", "system_fingerprint"})


def _is_preamble(event: object) -> bool:
    """An SSE event a stream sends before its first token: chat's role chunk, Responses' opening."""
    if not isinstance(event, dict):
        return False
    if "type" in event:
        return event["type"] in RESPONSES_PREAMBLE
    if not set(event) <= CHOICE_KEYS or event.get("usage"):  # e.g. an error event
        return False
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or choice.get("text") or choice.get("finish_reason") or "denoise" in choice:
            return False
    return True


def carries_tokens(chunk: bytes) -> bool:
    """Whether an SSE chunk holds anything past the stream's preamble (text, a denoise step, an error).

    Only a preamble may be held back: a stream in ``denoise`` mode shows its steps before any text
    is final, and holding those would freeze the live view until the first token.
    """
    for line in chunk.split(b"\n"):
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        try:
            event = json.loads(line[6:])
        except ValueError:
            return True  # not ours to judge: treat as sent
        if not _is_preamble(event):
            return True
    return False


class _Response:
    """What the front has passed to the client so far, and what it holds back."""

    def __init__(self, send) -> None:
        self.send = send
        self.start: dict[str, Any] | None = None
        self.held: list[dict[str, Any]] = []
        self.committed = False  # something with tokens (or a whole plain response) reached the client
        self.finished = False

    @property
    def streaming(self) -> bool:
        headers = dict(self.start["headers"]) if self.start else {}
        return headers.get(b"content-type", b"").startswith(b"text/event-stream")

    async def take(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.start = message
            return
        if message["type"] != "http.response.body":
            return
        if not self.committed and self.streaming and message.get("more_body", False):
            self.held.append(message)
            if not carries_tokens(message.get("body", b"")):
                return
            message = self.held.pop()
        await self._commit()
        await self.send(message)
        self.finished = not message.get("more_body", False)

    async def _commit(self) -> None:
        if self.committed:
            return
        self.committed = True
        await self.send(self.start)
        for held in self.held:
            await self.send(held)
        self.held.clear()

    async def fail(self) -> None:
        """End the exchange after a replica failure that cannot be retried."""
        if not self.committed:
            data = json.dumps(error_body(FAILED_MESSAGE, SERVER_ERROR, code="replica_failed")).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
            await self.send({"type": "http.response.start", "status": 503, "headers": headers})
            await self.send({"type": "http.response.body", "body": data, "more_body": False})
        elif self.streaming and not self.finished:
            event = sse(error_body(FAILED_MESSAGE, SERVER_ERROR, code="replica_failed")) + SSE_DONE
            await self.send({"type": "http.response.body", "body": event, "more_body": False})
        elif not self.finished:  # a plain response cut after its start: nothing better to say
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        self.finished = True


class FrontApp:
    """The ASGI app of the ``Front`` deployment: every HTTP request goes to a replica through ``handle``."""

    def __init__(self, handle) -> None:
        self.handle = handle.options(stream=True)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        await self._forward(request_scope(scope), body, send)

    async def _forward(self, scope: dict[str, Any], body: bytes, send) -> None:
        response = _Response(send)
        for attempt in range(RETRIES + 1):
            response.start, response.held = None, []
            try:
                async for message in self.handle.forward.remote(scope, body):
                    await response.take(message)
                return
            except Exception as exc:  # the replica died (RayActorError...) or its app raised
                retry = not response.committed and attempt < RETRIES
                log.warning(
                    "replica failed on %s %s (%s)%s",
                    scope.get("method"),
                    scope.get("path"),
                    type(exc).__name__,
                    "; retrying on another replica" if retry else "",
                )
                if not retry:
                    await response.fail()
                    return
