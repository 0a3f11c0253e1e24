"""``POST /v1/responses``: OpenAI's Responses API, text, structured output and function tools,
streamed or not.

Newer OpenAI clients default to this API. The request is mapped onto the chat path
(``responses_request.py`` has the table): ``instructions`` becomes a system message, ``input``
the conversation (message items, and ``function_call`` / ``function_call_output`` items as the
assistant's tool calls and the tool results), ``max_output_tokens`` the answer's length,
``text.format`` the ``response_format`` and ``tools`` / ``tool_choice`` / ``parallel_tool_calls``
chat's tools. So structured output and forced tool calls are grammar-enforced exactly as on
``/v1/chat/completions`` (``server/structured.py``): the output always parses and validates.
What this server cannot do (non-function tools, images and files, stored conversations via
``previous_response_id``, reasoning) is a 400 naming the field. Nothing is stored: ``store`` is
false in every answer.

The answer's ``output`` holds the items in the order the model wrote them: a ``message`` item for
its text (none when it wrote only calls) and one ``function_call`` item (``id`` ``fc_...``,
``call_id`` ``call_...``, ``name``, ``arguments``) per call, parsed from the text as on chat
(``tools.CallStream``).

A stream is OpenAI's event sequence, each event an SSE ``event:`` line plus its JSON ``data`` with
a ``sequence_number``: ``response.created``, ``response.in_progress``; per message item
``response.output_item.added``, ``response.content_part.added``, ``response.output_text.delta``
(as text commits), ``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``; per function call (sent whole once its text has committed)
``response.output_item.added``, ``response.function_call_arguments.delta``,
``response.function_call_arguments.done``, ``response.output_item.done``; then
``response.completed`` (or ``response.incomplete`` when ``max_output_tokens`` ended the answer).
A failure after the stream started is an ``error`` event.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from dllm_serve.server import tools
from dllm_serve.server.auth import require_api_key
from dllm_serve.server.errors import APIError, internal_error
from dllm_serve.server.lifecycle import (
    ChoiceOutcome,
    EngineFailure,
    GenerationRun,
    complete,
    failure_error,
)
from dllm_serve.server.preparation import accept, chat_prompt, output_constraint, prepare_generation
from dllm_serve.server.responses_request import ResponsesRequest
from dllm_serve.server.streaming import EventStreamResponse

responses = APIRouter(dependencies=[Depends(require_api_key)])

# Chat-path parameter names, in this API's spelling.
_PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
}

Event = tuple[str, dict[str, Any]]


def _renamed(exc: APIError) -> APIError:
    """Chat-path errors in this API's field names."""
    exc.param = _PARAMS.get(exc.param or "", exc.param)
    exc.message = exc.message.replace("max_tokens", "max_output_tokens").replace(
        "response_format", "text.format"
    )
    return exc


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@responses.post("/v1/responses")
async def create_response(request: Request) -> Response:
    state, engine, req = await accept(request, ResponsesRequest)
    try:
        prompt = await state.offload(chat_prompt, state, engine, req)
        constraint = await state.offload(output_constraint, engine, req)
        prepared = prepare_generation(state, engine, req, [prompt], "input", "resp", constraint)
    except APIError as exc:
        raise _renamed(exc) from None
    run = GenerationRun(state, engine, prepared)
    shape = _Shape(req, state.model_id)
    if req.stream:
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        tasks = run.choice_tasks(lambda _, d, _logprobs: queue.put_nowait(d))
        tasks[0].add_done_callback(lambda _: queue.put_nowait(None))
        return EventStreamResponse(_events(run, tasks[0], queue, shape), on_close=lambda: run.close(tasks))
    (outcome,) = await complete(request, run)
    output = OutputItems(tools.active(req))
    output.feed(outcome.text)
    output.finish(outcome.finish_reason)
    return JSONResponse(shape.response(outcome.finish_reason, output.items, run))


class OutputItems:
    """The response's output items, grown from the committed text, and the stream events that
    announce them: text goes into a message item (opened at the first text that is not white space),
    each call (with tools offered) becomes a function_call item, in the order the model wrote them.
    White space before a call or at the end after one is not a message."""

    def __init__(self, with_tools: bool) -> None:
        self.calls = tools.CallStream() if with_tools else None
        self.items: list[dict[str, Any]] = []
        self.open: int | None = None  # index of the message item text goes into
        self.blank = ""  # white space waiting for text to follow (before any message is open)

    def feed(self, text: str) -> list[Event]:
        if self.calls is None:
            return self._text(text)
        return [e for part in self.calls.feed(text) for e in self._part(part)]

    def finish(self, finish_reason: str) -> list[Event]:
        """The last events: the rest of the text, the open message closed (``incomplete`` if
        ``max_output_tokens`` ended it), and an empty message if nothing was written at all."""
        events = [e for part in (self.calls.finish() if self.calls else []) for e in self._part(part)]
        if self.open is None and not self.items:
            events += self._open_message()
            events += self._append(self.blank)
        if self.open is not None:
            events += self._close_message("incomplete" if finish_reason == "length" else "completed")
        return events

    def _part(self, part: str | dict[str, Any]) -> list[Event]:
        return self._text(part) if isinstance(part, str) else self._call(part)

    def _text(self, text: str) -> list[Event]:
        events: list[Event] = []
        if self.open is None:
            if not text.strip():
                self.blank += text
                return events
            text, self.blank = self.blank + text, ""
            events = self._open_message()
        return events + self._append(text)

    def _append(self, text: str) -> list[Event]:
        if not text or self.open is None:
            return []
        message = self.items[self.open]
        message["content"][0]["text"] += text
        where = {"item_id": message["id"], "output_index": self.open, "content_index": 0}
        return [("response.output_text.delta", {**where, "delta": text, "logprobs": []})]

    def _open_message(self) -> list[Event]:
        self.open = len(self.items)
        message = _message(_new_id("msg"), "in_progress", [])
        self.items.append({**message, "content": [_part("")]})
        where = {"item_id": message["id"], "output_index": self.open, "content_index": 0}
        return [
            ("response.output_item.added", {"output_index": self.open, "item": message}),
            ("response.content_part.added", {**where, "part": _part("")}),
        ]

    def _close_message(self, status: str) -> list[Event]:
        index, self.open = self.open, None
        assert index is not None
        message = self.items[index]
        message["status"] = status
        part = message["content"][0]
        where = {"item_id": message["id"], "output_index": index, "content_index": 0}
        return [
            ("response.output_text.done", {**where, "text": part["text"], "logprobs": []}),
            ("response.content_part.done", {**where, "part": dict(part)}),
            ("response.output_item.done", {"output_index": index, "item": _copy(message)}),
        ]

    def _call(self, call: dict[str, Any]) -> list[Event]:
        """A call parsed from the text (``tools._new_call``): any open message ends before it."""
        events = self._close_message("completed") if self.open is not None else []
        self.blank = ""
        index = len(self.items)
        function = call["function"]
        item = {
            "id": _new_id("fc"),
            "type": "function_call",
            "status": "completed",
            "call_id": call["id"],
            "name": function["name"],
            "arguments": function["arguments"],
        }
        self.items.append(item)
        where = {"item_id": item["id"], "output_index": index}
        return [
            *events,
            (
                "response.output_item.added",
                {"output_index": index, "item": {**item, "status": "in_progress", "arguments": ""}},
            ),
            ("response.function_call_arguments.delta", {**where, "delta": item["arguments"]}),
            (
                "response.function_call_arguments.done",
                {**where, "name": item["name"], "arguments": item["arguments"]},
            ),
            ("response.output_item.done", {"output_index": index, "item": dict(item)}),
        ]


def _message(item_id: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _copy(message: dict[str, Any]) -> dict[str, Any]:
    return {**message, "content": [dict(p) for p in message["content"]]}


class _Shape:
    """The Response object, fixed for one request."""

    def __init__(self, req: ResponsesRequest, model: str) -> None:
        self.req = req
        self.model = model
        self.id = _new_id("resp")
        self.created = int(time.time())

    def response(
        self, finish: str | None, output: list[dict[str, Any]], run: GenerationRun | None = None
    ) -> dict[str, Any]:
        """``finish`` None: still running; "length": incomplete; else completed."""
        status = "in_progress" if finish is None else "incomplete" if finish == "length" else "completed"
        req = self.req
        body: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "completed_at": int(time.time()) if finish is not None else None,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": None,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "background": False,
            "temperature": req.temperature if req.temperature is not None else 0.0,
            "top_p": req.top_p if req.top_p is not None else 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "top_logprobs": 0,
            "text": req.echo_text(),
            "tool_choice": req.echo_tool_choice(),
            "tools": req.echo_tools(),
            "truncation": "disabled",
            "service_tier": "default",
            "user": req.user,
            "metadata": {},
            "prompt_cache_key": req.prompt_cache_key,
            "safety_identifier": req.safety_identifier,
            "usage": None,
        }
        if run is not None:
            usage = run.usage()
            body["usage"] = {
                "input_tokens": usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["total_tokens"],
            }
            body["diffusion"] = run.diffusion()
        return body


def _event(kind: str, seq: int, **fields: Any) -> bytes:
    data = json.dumps(
        {"type": kind, "sequence_number": seq, **fields}, separators=(",", ":"), ensure_ascii=False
    )
    return f"event: {kind}\ndata: {data}\n\n".encode()


async def _events(
    run: GenerationRun, task: asyncio.Task[ChoiceOutcome], queue: asyncio.Queue[str | None], shape: _Shape
) -> AsyncIterator[bytes]:
    seq = iter(range(1 << 62))
    output = OutputItems(tools.active(shape.req))

    def sse(events: list[Event]) -> bytes:
        return b"".join(_event(kind, next(seq), **fields) for kind, fields in events)

    try:
        yield sse(
            [
                ("response.created", {"response": shape.response(None, [])}),
                ("response.in_progress", {"response": shape.response(None, [])}),
            ]
        )
        deadline = run.deadline()
        while True:
            try:
                left = None if deadline is None else max(0.0, deadline - time.perf_counter())
                delta = await asyncio.wait_for(queue.get(), left)
            except asyncio.TimeoutError:
                run.end_reason = "timeout"
                yield _error_event(next(seq), run.timeout_error())
                return
            if delta is not None:
                events = output.feed(delta)
                if events:
                    yield sse(events)
                continue
            failed = task.exception() if not task.cancelled() else asyncio.CancelledError()
            if failed is not None:
                run.end_reason = "error"
                yield _error_event(
                    next(seq),
                    failure_error(failed) if isinstance(failed, EngineFailure) else internal_error(),
                )
                return
            outcome = task.result()
            run.outcomes[0] = outcome
            events = output.finish(outcome.finish_reason)
            done = shape.response(outcome.finish_reason, output.items, run)
            final = "incomplete" if done["status"] == "incomplete" else "completed"
            yield sse([*events, (f"response.{final}", {"response": done})])
            return
    finally:
        run.close([task])


def _error_event(seq: int, error: APIError) -> bytes:
    """OpenAI's stream ``error`` event; its ``error`` object makes the official clients raise."""
    body = error.body()["error"]
    return _event("error", seq, code=body["code"], message=body["message"], param=body["param"], error=body)
