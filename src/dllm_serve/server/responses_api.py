"""``POST /v1/responses``: OpenAI's Responses API for text in and text out, streamed or not.

Newer OpenAI clients default to this API. A request is mapped onto the chat path: ``instructions``
becomes a system message, ``input`` (a string, or message items whose content is a string or
``input_text`` / ``output_text`` parts) the conversation, ``max_output_tokens`` the answer's
length; the diffusion fields work as in chat. What this server cannot do (tools, images and
files, stored conversations via ``previous_response_id``, structured output, reasoning) is a 400
naming the field, as everywhere else. Nothing is stored: ``store`` is false in every answer.

A stream is OpenAI's event sequence, each event an SSE ``event:`` line plus its JSON ``data`` with
a ``sequence_number``: ``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``, ``response.output_text.delta``
(as text commits), ``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``, then ``response.completed`` (or ``response.incomplete`` when
``max_output_tokens`` ended the answer). A failure after the stream started is an ``error`` event.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import field_validator

from dllm_serve.protocol import ChatMessage, DiffusionFields, one_algorithm
from dllm_serve.server.auth import require_api_key
from dllm_serve.server.errors import APIError, internal_error
from dllm_serve.server.lifecycle import (
    ChoiceOutcome,
    EngineFailure,
    GenerationRun,
    complete,
    failure_error,
)
from dllm_serve.server.preparation import accept, chat_prompt, prepare_generation
from dllm_serve.server.streaming import EventStreamResponse

responses = APIRouter(dependencies=[Depends(require_api_key)])

# Responses API fields this server does not implement, with the values that ask for nothing (the
# fields chat shares, such as tools, store or metadata, are refused by ``protocol.strip_unsupported``).
_NOTHING: dict[str, Callable[[Any], bool]] = {
    "max_tool_calls": lambda v: v is None,
    "previous_response_id": lambda v: v is None,
    "conversation": lambda v: v is None,
    "prompt": lambda v: v is None,
    "reasoning": lambda v: v is None or (isinstance(v, dict) and all(x is None for x in v.values())),
    "text": lambda v: v is None or v == {"format": {"type": "text"}} or v == {},
    "include": lambda v: v is None or v == [],
    "background": lambda v: v is None or v is False,
    "truncation": lambda v: v in (None, "disabled"),
    "stream_options": lambda v: v is None,
}
_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(DiffusionFields):  # type: ignore[misc, valid-type]
    """The supported subset of a Responses API request (unsupported fields are refused first)."""

    model: str
    input: Any
    instructions: str | None = None
    max_output_tokens: int | None = None
    stream: bool | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    algorithm: str | None = None
    generation_algorithm: str | None = None
    # The denoise view streams chat/completions chunks; Responses events carry committed text only.
    stream_mode: Literal["committed"] = "committed"

    @property
    def requested_logprobs(self) -> None:
        """Token log-probabilities are offered on chat and completions, not here."""
        return None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> ResponsesRequest:
        """Fields of the Responses API this server cannot honour are a 400 naming them, first."""
        return super().model_validate(_refuse_unsupported(obj), **kwargs)

    @field_validator("input")
    @classmethod
    def _input(cls, value: Any) -> list[ChatMessage]:
        if isinstance(value, str):
            return [ChatMessage(role="user", content=value)]
        if not isinstance(value, list) or not value:
            raise ValueError("input must be a non-empty string or a non-empty list of message items")
        return [_message(i, item) for i, item in enumerate(value)]

    @field_validator("max_output_tokens")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be a positive integer")
        return value

    _one_algorithm = field_validator("generation_algorithm")(one_algorithm)

    # What the chat path (preparation.chat_prompt, prepare_generation) reads from a request.
    n: ClassVar[int] = 1
    stop: ClassVar[list[str]] = []

    @property
    def messages(self) -> list[ChatMessage]:
        system = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        return system + self.input

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_output_tokens

    @property
    def algorithm_name(self) -> str | None:
        return self.algorithm or self.generation_algorithm

    def decode_overrides(self) -> dict[str, Any]:
        from dllm_serve.engine.algorithms import OVERRIDABLE

        return {name: getattr(self, name) for name in OVERRIDABLE if getattr(self, name) is not None}


def _message(index: int, item: Any) -> ChatMessage:
    """One input item: a message whose content is a string or text parts (nothing else)."""
    where = f"input[{index}]"
    if not isinstance(item, dict):
        raise ValueError(f"{where} must be a message object")
    if item.get("type", "message") != "message":
        raise ValueError(f"{where}.type {item.get('type')!r} is not supported (only 'message' items)")
    unknown = set(item) - {"type", "role", "content", "id", "status", "phase"}
    if unknown:
        raise ValueError(f"{where} has unsupported fields: {sorted(unknown)}")
    content = item.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
                raise ValueError(f"{where}.content[{j}]: only text parts are supported, got {kind!r}")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise ValueError(f"{where}.content must be a string or a list of text parts")
    try:
        return ChatMessage.model_validate({"role": item.get("role"), "content": content})
    except ValueError:
        raise ValueError(f"{where}.role must be one of system, developer, user, assistant") from None


def _refuse_unsupported(body: dict[str, Any]) -> dict[str, Any]:
    for key, asks_nothing in _NOTHING.items():
        if key in body and not asks_nothing(body[key]):
            raise APIError(
                400, f"'{key}' is not supported by this server", param=key, code="unsupported_parameter"
            )
    return {k: v for k, v in body.items() if k not in _NOTHING}


def _renamed(exc: APIError) -> APIError:
    """Chat-path errors in this API's field names."""
    exc.param = {"messages": "input", "max_tokens": "max_output_tokens"}.get(exc.param or "", exc.param)
    exc.message = exc.message.replace("max_tokens", "max_output_tokens")
    return exc


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@responses.post("/v1/responses")
async def create_response(request: Request) -> Response:
    state, engine, req = await accept(request, ResponsesRequest)
    try:
        prompt = await state.offload(chat_prompt, state, engine, req)
        prepared = prepare_generation(state, engine, req, [prompt], "input", "resp")
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
    return JSONResponse(shape.response(outcome.finish_reason, outcome.text, run))


class _Shape:
    """The Response object and its parts, fixed for one request."""

    def __init__(self, req: ResponsesRequest, model: str) -> None:
        self.req = req
        self.model = model
        self.id = _new_id("resp")
        self.message_id = _new_id("msg")
        self.created = int(time.time())

    def message(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [self.part(text)]
        return {
            "id": self.message_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    @staticmethod
    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def response(
        self, finish: str | None, text: str | None, run: GenerationRun | None = None
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
            "output": [] if finish is None else [self.message(status, text)],
            "parallel_tool_calls": False,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "background": False,
            "temperature": req.temperature if req.temperature is not None else 0.0,
            "top_p": req.top_p if req.top_p is not None else 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "top_logprobs": 0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
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
    where = {"item_id": shape.message_id, "output_index": 0, "content_index": 0}
    try:
        yield b"".join(
            [
                _event("response.created", next(seq), response=shape.response(None, None)),
                _event("response.in_progress", next(seq), response=shape.response(None, None)),
                _event(
                    "response.output_item.added",
                    next(seq),
                    output_index=0,
                    item=shape.message("in_progress", None),
                ),
                _event("response.content_part.added", next(seq), **where, part=shape.part("")),
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
                yield _event("response.output_text.delta", next(seq), **where, delta=delta, logprobs=[])
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
            done = shape.response(outcome.finish_reason, outcome.text, run)
            item = done["output"][0]
            yield b"".join(
                [
                    _event("response.output_text.done", next(seq), **where, text=outcome.text, logprobs=[]),
                    _event("response.content_part.done", next(seq), **where, part=shape.part(outcome.text)),
                    _event("response.output_item.done", next(seq), output_index=0, item=item),
                    _event(
                        f"response.{'incomplete' if done['status'] == 'incomplete' else 'completed'}",
                        next(seq),
                        response=done,
                    ),
                ]
            )
            return
    finally:
        run.close([task])


def _error_event(seq: int, error: APIError) -> bytes:
    """OpenAI's stream ``error`` event; its ``error`` object makes the official clients raise."""
    body = error.body()["error"]
    return _event("error", seq, code=body["code"], message=body["message"], param=body["param"], error=body)
