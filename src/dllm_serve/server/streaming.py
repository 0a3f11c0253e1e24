"""From engine events to client text: submission, incremental detokenization, stop strings, usage, SSE.

* ``EngineStream`` submits one engine request at once (so a full queue is a 429 before any response
  starts) and yields its events; closing it early aborts the request, which the engine retires
  within one iteration, freeing its cache.
* ``ChoiceText`` turns committed token ids into text that only ever grows: text ending in U+FFFD
  (an incomplete multi-byte character) and any tail that could still become a stop string are held
  back. A stop string ends the choice; nothing from it onwards is returned, and usage counts the
  tokens up to and including the one that completed it.
* ``EventStreamResponse`` writes Server-Sent Events and cancels the producer as soon as the client
  disconnects (not at the next write), so the engine request is aborted promptly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from dllm_serve.engine.denoise import DenoiseStep
from dllm_serve.engine.sequence import GenerationRequest, SequenceEvent, TokenLogprob

REPLACEMENT = "\ufffd"


class EngineStream:
    """One engine request's events on the asyncio loop.

    ``add_request`` runs in the constructor and raises ``QueueFullError`` when the queue is full.
    """

    def __init__(self, engine, request: GenerationRequest) -> None:
        self.engine = engine
        self.request_id = request.request_id
        self.finished = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[SequenceEvent] = asyncio.Queue()
        engine.add_request(request, self._on_event)

    def _on_event(self, event: SequenceEvent) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def events(self) -> AsyncIterator[SequenceEvent]:
        while not self.finished:
            event = await self._queue.get()
            self.finished = event.finished
            yield event

    def abort(self) -> None:
        if not self.finished:
            self.engine.abort(self.request_id)

    async def abort_and_wait(self, timeout: float = 2.0) -> SequenceEvent | None:
        """Abort, then wait (briefly: one engine iteration) for the final event, which counts forwards."""
        self.abort()

        async def final() -> SequenceEvent | None:
            async for event in self.events():
                if event.finished:
                    return event
            return None

        with contextlib.suppress(asyncio.TimeoutError):
            return await asyncio.wait_for(final(), timeout)
        return None


class ChoiceText:
    """Text of one choice, grown from committed tokens; see the module docstring."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self._longest_stop = max((len(s) for s in stop), default=0)
        self.token_ids: list[int] = []
        self.text = ""  # decoded text of all tokens (up to the stop string, once one is found)
        self.sent = 0  # characters of ``text`` already returned
        self.stop_hit: str | None = None
        self.tokens_to_stop: int | None = None  # usage when a stop string ended the choice
        self._searched = 0  # stop strings cannot start before this offset any more

    def add(self, token_ids: list[int]) -> str:
        """Feed newly committed tokens; the text that may now be sent."""
        for token in token_ids:
            if self.stop_hit is not None:
                break
            self.token_ids.append(token)
            if not self.stop:
                continue
            self.text = self.tokenizer.decode(self.token_ids)
            self._find_stop()
        if not self.stop and token_ids:
            self.text = self.tokenizer.decode(self.token_ids)
        return self._take(final=self.stop_hit is not None)

    def finish(self) -> str:
        """The rest of the text when the choice is over."""
        return self._take(final=True)

    def _find_stop(self) -> None:
        start = max(0, self._searched - self._longest_stop + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            pos = self.text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is not None:
            self.stop_hit = best[1]
            self.tokens_to_stop = len(self.token_ids)
            self.text = self.text[: best[0]]
        else:
            self._searched = len(self.text.rstrip(REPLACEMENT))

    def _safe_end(self, final: bool) -> int:
        end = len(self.text)
        if final:  # nothing more will come: bytes still invalid now stay U+FFFD, as in a full decode
            return end
        while end > self.sent and self.text[end - 1] == REPLACEMENT:
            end -= 1  # maybe an incomplete multi-byte character: wait for its remaining bytes
        if not self.stop:
            return end
        for keep in range(min(self._longest_stop - 1, end - self.sent), 0, -1):
            tail = self.text[end - keep : end]
            if any(s.startswith(tail) for s in self.stop):
                return end - keep  # might be the start of a stop string
        return end

    def _take(self, final: bool) -> str:
        end = self._safe_end(final)
        if end <= self.sent:
            return ""
        out = self.text[self.sent : end]
        self.sent = end
        return out

    def completion_tokens(self, stopped_on_token: bool) -> int:
        """Usage: tokens returned, plus the stop token; up to the stop string's last token if one hit."""
        if self.tokens_to_stop is not None:
            return self.tokens_to_stop
        return len(self.token_ids) + int(stopped_on_token)


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


class EngineFailure(Exception):
    """A choice the engine ended with "error" or "abort" (shutdown); the route maps it to 500/503."""

    def __init__(self, reason: str, detail: str | None) -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ChoiceOutcome:
    index: int
    text: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int
    forwards: int
    logprobs: list[TokenLogprob] | None = None  # one per returned token, when asked


async def run_choice(
    index: int,
    stream: EngineStream,
    text: ChoiceText,
    emit: Callable[[int, str, list[TokenLogprob] | None], None] | None = None,
    on_tokens: Callable[[], None] | None = None,
    on_denoise: Callable[[int, DenoiseStep], None] | None = None,
) -> ChoiceOutcome:
    """Consume one engine request to its end; ``emit(index, delta, logprobs)`` gets text as it
    becomes final, with the log-probabilities (when asked) of the tokens received since the last
    delta (their text may still be held back: a possible stop string, an incomplete character);
    ``on_denoise(index, step)`` gets each engine step of a request that traces them.

    Leaving early (cancelled, stop string) aborts the engine request.
    """
    forwards = 0
    entries: list[TokenLogprob] | None = None  # tokens accepted by ``text`` (up to a stop string)
    sent = 0

    def push(delta: str, last: bool = False) -> None:
        nonlocal sent
        if emit is None:
            return
        chunk = entries[sent:] if entries is not None else None
        if delta or (last and chunk):
            emit(index, delta, chunk)
            sent = len(entries) if entries is not None else 0

    def outcome(reason: str, stopped_on_token: bool = False) -> ChoiceOutcome:
        return ChoiceOutcome(
            index, text.text[: text.sent], reason, text.completion_tokens(stopped_on_token), forwards, entries
        )

    try:
        async for event in stream.events():
            if event.denoise is not None and on_denoise is not None:
                on_denoise(index, event.denoise)
            if event.token_ids and on_tokens is not None:
                on_tokens()
            forwards = max(forwards, event.forwards)
            before = len(text.token_ids)
            delta = text.add(event.token_ids)
            if event.logprobs is not None:
                entries = (entries or []) + event.logprobs[: len(text.token_ids) - before]
            push(delta)
            if text.stop_hit is not None:
                push("", last=True)
                final = await stream.abort_and_wait()
                if final is not None:
                    forwards = max(forwards, final.forwards)
                return outcome("stop")
            if event.finished:
                if event.finish_reason not in ("stop", "length"):
                    raise EngineFailure(event.finish_reason or "error", event.error)
                push(text.finish(), last=True)
                return outcome(event.finish_reason, event.stopped_on_token)
        raise EngineFailure("error", "event stream ended without a final event")
    finally:
        stream.abort()
