"""Server-Sent Events: the writer and the chat/completions chunk stream.

* ``EventStreamResponse`` writes ``text/event-stream`` and cancels the producer as soon as the
  client disconnects (not at the next write), so the engine request is aborted promptly.
* ``stream_response`` submits a ``GenerationRun``'s choices first (a full queue is still a real
  429), then streams: a first chunk per choice (the role, for chat), deltas as text commits (and,
  in stream_mode denoise, one chunk per engine step), a final chunk per choice with its
  finish_reason, the usage chunk when asked, then ``[DONE]``; a failure is an ``error`` event.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from dllm_serve.engine.sequence import TokenLogprob
from dllm_serve.protocol_responses import ChunkObject, chunk_body, diffusion_dict, now
from dllm_serve.server.denoise_stream import DenoiseView
from dllm_serve.server.errors import internal_error
from dllm_serve.server.lifecycle import ChoiceOutcome, EngineFailure, GenerationRun, failure_error

log = logging.getLogger(__name__)


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")


class EventStreamResponse(Response):
    """``text/event-stream`` from an async iterator of bytes; a client disconnect cancels the iterator."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None] | None = None) -> None:
        # No Content-Length: the body's length is not known up front.
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self.chunks = chunks
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async with anyio.create_task_group() as tg:

                async def pump() -> None:
                    async for chunk in self.chunks:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(pump)
                tg.start_soon(watch)
        except OSError:  # the client went away while we were writing
            pass
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.chunks, "aclose", None)
                if aclose is not None:
                    await aclose()
            if self.on_close is not None:
                self.on_close()


class ChunkChoice(Protocol):
    """Builds a chunk's choice (``protocol_responses.chat_delta`` / ``text_delta``)."""

    def __call__(
        self, index: int, text: str | None, finish: str | None, first: bool = False, logprobs: Any = None
    ) -> dict[str, Any]: ...


# (choice index, a text delta / a denoise step's JSON / None at the choice's end, formatted logprobs)
_Item = tuple[int, str | dict[str, Any] | None, Any]


def stream_response(
    run: GenerationRun,
    kind: ChunkObject,
    include_usage: bool,
    choice: ChunkChoice,
    fmt_logprobs: Callable[[list[TokenLogprob]], dict[str, Any] | None],
) -> EventStreamResponse:
    """Submit first (a full queue is still a real 429), then stream. ``fmt_logprobs`` turns a
    delta's token log-probabilities into the response's ``logprobs`` object."""
    queue: asyncio.Queue[_Item] = asyncio.Queue()
    on_denoise = None
    if run.prepared.denoise:  # each engine step's JSON goes to the same queue as the text
        view = DenoiseView(run.tokenizer)
        on_denoise = view.sender(lambda item: queue.put_nowait((*item, None)))
    tasks = run.choice_tasks(
        lambda i, d, lp: queue.put_nowait((i, d, None if lp is None else fmt_logprobs(lp))), on_denoise
    )
    for i, task in enumerate(tasks):  # (i, None, None) marks the end of choice i, after all its deltas
        task.add_done_callback(functools.partial(_mark_end, queue, i))
    return EventStreamResponse(
        _chunks(run, tasks, queue, kind, include_usage, choice), on_close=lambda: run.close(tasks)
    )


def _mark_end(queue: asyncio.Queue[_Item], index: int, _task: asyncio.Task[ChoiceOutcome]) -> None:
    queue.put_nowait((index, None, None))


async def _chunks(
    run: GenerationRun,
    tasks: list[asyncio.Task[ChoiceOutcome]],
    queue: asyncio.Queue[_Item],
    kind: ChunkObject,
    include_usage: bool,
    choice: ChunkChoice,
) -> AsyncIterator[bytes]:
    """The SSE body of ``stream_response`` (see the module docstring)."""
    prepared = run.prepared
    created = now()
    model = run.state.model_id

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse(chunk_body(kind, prepared.request_id, created, model, choices, include_usage, **extra))

    out: list[bytes] = []  # chunks ready now, written together (fewer writes per request)
    try:
        if kind == "chat.completion.chunk":
            out += [chunk([choice(i, None, None, first=True)]) for i in range(len(tasks))]
        deadline = run.deadline()
        remaining = len(tasks)
        while remaining:
            if out:
                yield b"".join(out)
                out.clear()
            try:
                if deadline is None:
                    index, text, logprobs = await queue.get()
                else:
                    left = max(0.0, deadline - time.perf_counter())
                    index, text, logprobs = await asyncio.wait_for(queue.get(), left)
            except asyncio.TimeoutError:
                run.end_reason = "timeout"
                out.append(sse(run.timeout_error().body()))
                break
            if isinstance(text, dict):
                out.append(chunk([{**choice(index, None, None), "denoise": text}]))
                continue
            if text is not None:
                body = choice(index, text, None, logprobs=logprobs)
                if body.get("delta", True) or body.get("logprobs") is not None:  # held-back tool-call text
                    out.append(chunk([body]))  # sends nothing until the call is whole
                continue
            remaining -= 1  # choice ``index`` ended; its deltas were queued before this marker
            task = tasks[index]
            failed = task.exception() if not task.cancelled() else asyncio.CancelledError()
            if failed is not None:
                run.end_reason = "error"
                if not isinstance(failed, EngineFailure):
                    log.error("streaming choice failed", exc_info=failed)
                err = failure_error(failed) if isinstance(failed, EngineFailure) else internal_error()
                out.append(sse(err.body()))
                break
            o = task.result()
            run.outcomes[o.index] = o
            out.append(
                chunk(
                    [choice(o.index, None, o.finish_reason)],
                    diffusion=diffusion_dict(prepared.algorithm, o.forwards, o.completion_tokens),
                )
            )
        else:
            if include_usage:
                out.append(chunk([], usage=run.usage(), diffusion=run.diffusion()))
        out.append(SSE_DONE)
        yield b"".join(out)
    finally:
        run.close(tasks)
