"""HTTP endpoints: OpenAI chat/completions/models, the algorithm catalogue, health and metrics.

A generation request goes: parse strictly -> prompt token ids -> length check -> preset
resolution (``engine.resolve_params``: request > checkpoint > preset defaults; a ``ParamError``
is a 400 naming the field) -> one engine request per choice (``n``; seed+i per choice when a seed
is given) -> JSON, or SSE as text commits.
Prompts and outputs are never logged above DEBUG.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from dllm_serve.engine.algorithms import ParamError, describe_presets
from dllm_serve.engine.scheduler import QueueFullError
from dllm_serve.engine.sequence import GenerationRequest, TokenLogprob, canvas_length
from dllm_serve.protocol import (
    DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    UnsupportedFieldError,
    diffusion_dict,
    new_id,
    now,
    strip_unsupported,
    usage_dict,
)
from dllm_serve.server.auth import require_api_key
from dllm_serve.server.denoise_stream import DenoiseView
from dllm_serve.server.errors import (
    SERVER_ERROR,
    APIError,
    bad_request,
    from_validation_error,
    internal_error,
)
from dllm_serve.server.logprobs import chat_logprobs, completion_logprobs
from dllm_serve.server.metrics import CONTENT_TYPE
from dllm_serve.server.prompts import check_fits
from dllm_serve.server.streaming import (
    SSE_DONE,
    ChoiceOutcome,
    ChoiceText,
    EngineFailure,
    EngineStream,
    EventStreamResponse,
    run_choice,
    sse,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"  # a full queue drains quickly: one engine iteration frees slots

router = APIRouter()
api = APIRouter(dependencies=[Depends(require_api_key)])


def _state(request: Request):
    return request.app.state.server


# ------------------------------------------------------------------------------ catalogue


@api.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = _state(request)
    return {
        "object": "list",
        "data": [{"id": state.model_id, "object": "model", "created": 0, "owned_by": "dllm-serve"}],
    }


@api.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    state = _state(request)
    if model_id != state.model_id:
        raise _model_not_found(model_id)
    return {"id": state.model_id, "object": "model", "created": 0, "owned_by": "dllm-serve"}


@api.get("/v1/algorithms")
@api.get("/generation/algorithms")
async def list_algorithms(request: Request) -> dict[str, Any]:
    """Presets, aliases and defaults for the loaded model (all presets while it loads)."""
    state = _state(request)
    engine = state.engine
    family = engine.loaded.family if engine is not None else None
    return {
        "object": "list",
        "model": state.model_id,
        "default": engine.default_algorithm if engine is not None else None,
        "data": describe_presets(family),
    }


# ------------------------------------------------------------------------------ health, metrics


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = _state(request)
    engine = state.engine
    status = "failed" if state.engine_failure else state.status
    body: dict[str, Any] = {"status": status, "model": state.model_id}
    if state.engine_failure:
        body["reason"] = state.engine_failure
    if engine is not None:
        stats = engine.stats()
        body.update(
            engine=engine.config.engine,
            algorithm=engine.default_algorithm,
            device=str(engine.config.resolved_device()),
            waiting=stats.waiting,
            running=stats.running,
            finished=stats.finished,
            kv_cache={
                "bytes_per_token": stats.kv_bytes_per_token,
                "capacity_tokens": stats.kv_capacity_tokens,
                "used_tokens": stats.kv_used_tokens,
                "peak_used_tokens": stats.kv_peak_used_tokens,
            },
        )
    return JSONResponse(body, status_code=200 if status == "ready" else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = _state(request)
    return Response(state.metrics.render(state.engine), media_type=CONTENT_TYPE)


# ------------------------------------------------------------------------------ generation


async def _parse(request: Request, model: type) -> Any:
    return await _state(request).offload(_decode, await request.body(), model)


def _decode(raw: bytes, model: type) -> Any:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad_request("The request body is not valid JSON.", code="invalid_json") from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return model.model_validate(strip_unsupported(body))
    except UnsupportedFieldError as exc:
        raise bad_request(str(exc), exc.param, "unsupported_parameter") from None
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply.", code="invalid_json") from None


def _model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")


@dataclasses.dataclass
class _Prepared:
    """A validated generation: prompts, their per-choice engine requests, the resolved algorithm."""

    request_id: str
    prompts: list[list[int]]
    requests: list[GenerationRequest]
    algorithm: str
    stop: list[str]
    denoise: bool = False  # stream_mode "denoise": each engine step is streamed too


def _prepare(state, req, prompts: list[list[int]], prompt_param: str, prefix: str) -> _Prepared:
    engine = state.engine
    if req.model and req.model != state.model_id:
        raise _model_not_found(req.model)
    if req.requested_logprobs is not None and not engine.supports_logprobs:
        raise bad_request("logprobs need the native engine (not --trust-remote-code).", "logprobs")
    max_tokens = req.requested_max_tokens or DEFAULT_MAX_TOKENS
    max_len = state.max_model_len
    for ids in prompts:
        if len(ids) + max_tokens > max_len:
            raise bad_request(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                "completion). Please reduce the prompt or max_tokens.",
                prompt_param,
                "context_length_exceeded",
            )
    try:
        params = engine.resolve_params(max_tokens, req.decode_overrides(), req.algorithm_name)
    except ParamError as exc:
        raise bad_request(str(exc), exc.param, "invalid_value") from None
    for ids in prompts:
        if canvas_length(len(ids), params) > max_len:
            canvas = canvas_length(len(ids), params) - len(ids)
            raise bad_request(
                f"max_tokens {max_tokens} rounds up to a canvas of {canvas} tokens (whole blocks "
                f"of block_length {params.block_length}); with the {len(ids)}-token prompt that exceeds "
                f"the model's maximum context length of {max_len} tokens.",
                "max_tokens",
                "context_length_exceeded",
            )
    denoise = req.stream_mode == "denoise"
    if denoise and not engine.traces_denoise:
        raise bad_request(
            "stream_mode 'denoise' needs the native engine (not --trust-remote-code).", "stream_mode"
        )
    request_id = new_id(prefix)
    requests = []
    for p, ids in enumerate(prompts):
        for i in range(req.n):
            k = p * req.n + i
            seed = req.seed + k if req.seed is not None else secrets.randbits(31)
            requests.append(
                GenerationRequest(
                    f"{request_id}-{k}",
                    list(ids),
                    dataclasses.replace(params, seed=seed),
                    max_tokens,
                    denoise=denoise,
                    logprobs=req.requested_logprobs,
                )
            )
    return _Prepared(request_id, prompts, requests, params.algorithm, req.stop, denoise)


def _submit(state, prepared: _Prepared) -> list[EngineStream]:
    """One engine request per choice; all or none (a full queue is a 429 before anything starts)."""
    streams: list[EngineStream] = []
    try:
        for r in prepared.requests:
            streams.append(EngineStream(state.engine, r))
    except QueueFullError:
        for s in streams:
            s.abort()
        if state.status == "draining":
            raise APIError(
                503, "The server is shutting down.", type=SERVER_ERROR, code="service_unavailable"
            ) from None
        state.metrics.http_errors.labels(status="429").inc()
        raise APIError(
            429,
            f"The server's queue is full ({state.config.engine.max_queue} waiting requests); retry later.",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": RETRY_AFTER_S},
        ) from None
    return streams


def _failure(exc: EngineFailure) -> APIError:
    if exc.reason == "abort":
        return APIError(
            503, "The request was cancelled: the server is shutting down.", type=SERVER_ERROR, code="aborted"
        )
    log.warning("engine failed a request: %s", exc.detail)
    return internal_error()


def _timeout_error(seconds: float) -> APIError:
    return APIError(
        504, f"The request did not finish within {seconds:g} seconds.", type=SERVER_ERROR, code="timeout"
    )


class _Run:
    """One HTTP generation in flight: choices, timing and metrics."""

    def __init__(self, state, prepared: _Prepared, tokenizer) -> None:
        self.state = state
        self.prepared = prepared
        self.tokenizer = tokenizer
        self.arrived = time.perf_counter()
        self.first_token: float | None = None
        self.outcomes: dict[int, ChoiceOutcome] = {}
        self.streams: list[EngineStream] = []
        self.closed = False
        self.end_reason = "abort"  # for choices that never finished (disconnect, timeout, error)

    def on_tokens(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
            self.state.metrics.ttft.observe(self.first_token - self.arrived)

    def deadline(self) -> float | None:
        timeout = self.state.config.request_timeout
        return None if not timeout else self.arrived + timeout

    def choice_tasks(self, emit=None, on_denoise=None) -> list[asyncio.Task[ChoiceOutcome]]:
        self.streams = _submit(self.state, self.prepared)
        self.state.metrics.prompt_tokens.inc(sum(len(p) for p in self.prepared.prompts))
        return [
            asyncio.create_task(
                run_choice(
                    i, s, ChoiceText(self.tokenizer, self.prepared.stop), emit, self.on_tokens, on_denoise
                )
            )
            for i, s in enumerate(self.streams)
        ]

    def close(self, tasks: list[asyncio.Task[ChoiceOutcome]]) -> None:
        """Cancel what still runs, abort its engine requests, record metrics (once)."""
        if self.closed:
            return
        self.closed = True
        for t in tasks:
            t.cancel()
        for s in self.streams:
            s.abort()
        m = self.state.metrics
        for o in self.outcomes.values():
            m.observe_choice(o.finish_reason, o.completion_tokens, o.forwards)
        for _ in range(len(self.streams) - len(self.outcomes)):
            m.finished.labels(reason=self.end_reason).inc()
        m.e2e.observe(time.perf_counter() - self.arrived)

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.prepared.prompts)
        return usage_dict(prompt, sum(o.completion_tokens for o in self.outcomes.values()))

    def diffusion(self) -> dict[str, Any]:
        return diffusion_dict(
            self.prepared.algorithm,
            sum(o.forwards for o in self.outcomes.values()),
            sum(o.completion_tokens for o in self.outcomes.values()),
        )


async def _watch_disconnect(request: Request) -> None:
    """Returns when the client has gone (the request body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _complete(request: Request, run: _Run) -> list[ChoiceOutcome]:
    """All choices, unless the client leaves, the request times out or the engine fails one."""
    tasks = run.choice_tasks()
    watcher = asyncio.create_task(_watch_disconnect(request))
    try:
        deadline = run.deadline()
        pending: set[asyncio.Future[Any]] = {*tasks, watcher}
        while any(not t.done() for t in tasks):
            timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
            done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                run.end_reason = "timeout"
                raise _timeout_error(run.state.config.request_timeout)
            if watcher in done:
                log.debug("%s: client disconnected", run.prepared.request_id)
                raise APIError(499, "client disconnected")
            for t in done:
                exc = t.exception()
                if isinstance(exc, EngineFailure):
                    run.end_reason = "error" if exc.reason != "abort" else "abort"
                    raise _failure(exc)
                if exc is not None:
                    run.end_reason = "error"
                    raise exc
                outcome = t.result()
                run.outcomes[outcome.index] = outcome
        return [run.outcomes[i] for i in range(len(tasks))]
    finally:
        watcher.cancel()
        run.close(tasks)


def _check_ready_and_tokenize_chat(state, req: ChatCompletionRequest) -> list[int]:
    tok = state.engine.loaded.tokenizer
    messages = [m.template_dict() for m in req.messages]
    plain = not state.config.allow_special_tokens_in_content
    if state.config.use_chat_template and tok.has_chat_template:
        try:
            rendered = tok.render_chat_text(messages, plain)
        except Exception:  # a template that rejects this conversation (e.g. role order)
            raise bad_request("The chat template cannot render these messages.", "messages") from None
        check_fits(state, tok.min_tokens(rendered.plain()), req, "messages")
        return tok.encode_chat(rendered)
    text = "\n".join(m["content"] for m in messages)
    check_fits(state, tok.min_tokens(text), req, "messages")
    return tok.encode_plain(text) if plain else tok.encode(text)


@api.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    state = _state(request)
    engine = state.ready_engine()
    req = await _parse(request, ChatCompletionRequest)
    prompt = await state.offload(_check_ready_and_tokenize_chat, state, req)
    prepared = _prepare(state, req, [prompt], "messages", "chatcmpl")
    run = _Run(state, prepared, engine.loaded.tokenizer)
    log.debug("%s: %d prompt tokens, n=%d, %s", prepared.request_id, len(prompt), req.n, prepared.algorithm)
    if req.stream:
        return _stream_response(
            run,
            "chat.completion.chunk",
            req.include_usage,
            _chat_delta,
            lambda e: chat_logprobs(run.tokenizer, e),
        )
    outcomes = await _complete(request, run)
    return JSONResponse(
        {
            "id": prepared.request_id,
            "object": "chat.completion",
            "created": now(),
            "model": state.model_id,
            "choices": [
                {
                    "index": o.index,
                    "message": {"role": "assistant", "content": o.text, "refusal": None, "annotations": []},
                    "logprobs": chat_logprobs(run.tokenizer, o.logprobs) if o.logprobs is not None else None,
                    "finish_reason": o.finish_reason,
                }
                for o in outcomes
            ],
            "usage": run.usage(),
            "diffusion": run.diffusion(),
        }
    )


def _encode_prompts(state, req: CompletionRequest) -> list[list[int]]:
    tok = state.engine.loaded.tokenizer
    vocab = len(tok.hf)
    out = []
    for p in req.prompt:
        if isinstance(p, str):
            check_fits(state, tok.min_tokens(p), req, "prompt")
            ids = tok.encode(p)
            if not ids:
                raise bad_request("The prompt must not be empty.", "prompt")
        else:
            if any(t < 0 or t >= vocab for t in p):
                raise bad_request(f"Token ids in prompt must be in [0, {vocab}).", "prompt")
            ids = list(p)
        out.append(ids)
    return out


@api.post("/v1/completions")
async def completions(request: Request) -> Response:
    state = _state(request)
    engine = state.ready_engine()
    req = await _parse(request, CompletionRequest)
    prompts = await state.offload(_encode_prompts, state, req)
    if req.echo:  # scoring a prompt (lm-eval's loglikelihood requests): server/scoring_routes.py
        from dllm_serve.server.scoring_routes import echo_completion

        return await echo_completion(request, state, req, prompts)
    if req.requested_max_tokens == 0:
        raise bad_request("max_tokens must be at least 1 (0 is allowed with echo).", "max_tokens")
    prepared = _prepare(state, req, prompts, "prompt", "cmpl")
    run = _Run(state, prepared, engine.loaded.tokenizer)
    log.debug("%s: %d prompts, n=%d, %s", prepared.request_id, len(prompts), req.n, prepared.algorithm)
    if req.stream:
        return _stream_response(
            run,
            "text_completion",
            req.include_usage,
            _text_delta,
            lambda e: _text_logprobs(run.tokenizer, e, req.logprobs or 0),
        )
    outcomes = await _complete(request, run)
    return JSONResponse(
        {
            "id": prepared.request_id,
            "object": "text_completion",
            "created": now(),
            "model": state.model_id,
            "choices": [
                {
                    "index": o.index,
                    "text": o.text,
                    "logprobs": _text_logprobs(run.tokenizer, o.logprobs, req.logprobs or 0),
                    "finish_reason": o.finish_reason,
                }
                for o in outcomes
            ],
            "usage": run.usage(),
            "diffusion": run.diffusion(),
        }
    )


# ------------------------------------------------------------------------------ streaming


def _stream_response(run: _Run, kind: str, include_usage: bool, choice, fmt_logprobs) -> EventStreamResponse:
    """Submit first (a full queue is still a real 429), then stream. ``fmt_logprobs`` turns a
    delta's token log-probabilities into the response's ``logprobs`` object."""
    queue: asyncio.Queue[tuple[int, str | dict[str, Any] | None, Any]] = asyncio.Queue()
    on_denoise = None
    if run.prepared.denoise:  # each engine step's JSON goes to the same queue as the text
        view = DenoiseView(run.tokenizer)
        on_denoise = view.sender(lambda item: queue.put_nowait((*item, None)))
    tasks = run.choice_tasks(
        lambda i, d, lp: queue.put_nowait((i, d, None if lp is None else fmt_logprobs(lp))), on_denoise
    )
    for i, task in enumerate(tasks):  # (i, None, None) marks the end of choice i, after all its deltas
        task.add_done_callback(lambda _, i=i: queue.put_nowait((i, None, None)))
    return EventStreamResponse(
        _stream(run, tasks, queue, kind, include_usage, choice), on_close=lambda: run.close(tasks)
    )


def _text_logprobs(tok, entries: list[TokenLogprob] | None, top: int) -> dict[str, Any] | None:
    return None if entries is None else completion_logprobs(tok, entries, [e.token for e in entries], top)


def _chat_delta(
    index: int, text: str | None, finish: str | None, first: bool = False, logprobs: Any = None
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if first:
        delta = {"role": "assistant", "content": "", "refusal": None}
    elif text is not None:
        delta = {"content": text}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def _text_delta(
    index: int, text: str | None, finish: str | None, first: bool = False, logprobs: Any = None
) -> dict[str, Any]:
    return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}


async def _stream(
    run: _Run,
    tasks: list[asyncio.Task[ChoiceOutcome]],
    queue: asyncio.Queue[tuple[int, str | dict[str, Any] | None, Any]],
    kind: str,
    include_usage: bool,
    choice,
) -> AsyncIterator[bytes]:
    """SSE: a first chunk per choice (the role, for chat), deltas as text commits (and, in stream_mode
    denoise, a chunk with an empty delta and a ``denoise`` field per engine step), a final chunk per
    choice with its finish_reason, the usage chunk when asked, then [DONE]."""
    prepared = run.prepared
    created = now()
    model = run.state.model_id

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body: dict[str, Any] = {
            "id": prepared.request_id,
            "object": kind,
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            body["usage"] = None
        body.update(extra)
        return sse(body)

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
                out.append(sse(_timeout_error(run.state.config.request_timeout).body()))
                break
            if isinstance(text, dict):
                out.append(chunk([{**choice(index, None, None), "denoise": text}]))
                continue
            if text is not None:
                out.append(chunk([choice(index, text, None, logprobs=logprobs)]))
                continue
            remaining -= 1  # choice ``index`` ended; its deltas were queued before this marker
            task = tasks[index]
            failed = task.exception() if not task.cancelled() else asyncio.CancelledError()
            if failed is not None:
                run.end_reason = "error"
                if not isinstance(failed, EngineFailure):
                    log.error("streaming choice failed", exc_info=failed)
                err = _failure(failed) if isinstance(failed, EngineFailure) else internal_error()
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
