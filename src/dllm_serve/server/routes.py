"""HTTP endpoints: OpenAI chat/completions/models, the algorithm catalogue, health and metrics.

The handlers only list the steps of a request: ``preparation.py`` accepts and prepares it (parse,
model check, prompt tokens, lengths, parameters, one engine request per choice), ``lifecycle.py``
runs it (submit, choices, abort on disconnect or timeout), ``streaming.py`` writes SSE and
``protocol_responses.py`` builds the JSON bodies.
Prompts and outputs are never logged above DEBUG.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from dllm_serve.engine.algorithms import describe_presets, describe_rules
from dllm_serve.engine.sequence import TokenLogprob
from dllm_serve.protocol import ChatCompletionRequest, CompletionRequest
from dllm_serve.protocol_responses import (
    chat_choice,
    chat_delta,
    completion_body,
    completion_choice,
    text_delta,
)
from dllm_serve.server import tools
from dllm_serve.server.auth import require_api_key
from dllm_serve.server.errors import bad_request
from dllm_serve.server.lifecycle import GenerationRun, complete
from dllm_serve.server.logprobs import chat_logprobs, completion_logprobs
from dllm_serve.server.metrics import CONTENT_TYPE
from dllm_serve.server.preparation import (
    accept,
    chat_prompt,
    completion_prompts,
    model_not_found,
    output_constraint,
    prepare_generation,
    server_state,
)
from dllm_serve.server.streaming import stream_response

log = logging.getLogger(__name__)

router = APIRouter()
api = APIRouter(dependencies=[Depends(require_api_key)])


# ------------------------------------------------------------------------------ catalogue


@api.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = server_state(request)
    return {
        "object": "list",
        "data": [{"id": state.model_id, "object": "model", "created": 0, "owned_by": "dllm-serve"}],
    }


@api.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    state = server_state(request)
    if model_id != state.model_id:
        raise model_not_found(model_id)
    return {"id": state.model_id, "object": "model", "created": 0, "owned_by": "dllm-serve"}


@api.get("/v1/algorithms")
@api.get("/generation/algorithms")
async def list_algorithms(request: Request) -> dict[str, Any]:
    """Presets, aliases and defaults for the loaded model, its checkpoint's defaults applied (all
    presets, with their own defaults, while it loads)."""
    state = server_state(request)
    engine = state.engine
    family = engine.loaded.family if engine is not None else None
    return {
        "object": "list",
        "model": state.model_id,
        "default": engine.default_algorithm if engine is not None else None,
        "data": describe_presets(family, engine.model_defaults if engine is not None else None),
        "rules": describe_rules(),
    }


# ------------------------------------------------------------------------------ health, metrics


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = server_state(request)
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
            prompt_cache={
                "capacity_bytes": stats.prompt_cache.budget_bytes,
                "used_bytes": stats.prompt_cache.used_bytes,
                "blocks": stats.prompt_cache.blocks,
            },
        )
    return JSONResponse(body, status_code=200 if status == "ready" else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = server_state(request)
    return Response(state.metrics.render(state.engine), media_type=CONTENT_TYPE)


# ------------------------------------------------------------------------------ generation


@api.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    state, engine, req = await accept(request, ChatCompletionRequest)
    prompt = await state.offload(chat_prompt, state, engine, req)
    constraint = await state.offload(output_constraint, engine, req)
    prepared = prepare_generation(state, engine, req, [prompt], "messages", "chatcmpl", constraint)
    with_tools = tools.active(req)
    run = GenerationRun(state, engine, prepared)
    log.debug("%s: %d prompt tokens, n=%d, %s", prepared.request_id, len(prompt), req.n, prepared.algorithm)
    if req.stream:
        return stream_response(
            run,
            "chat.completion.chunk",
            req.include_usage,
            tools.ChatDeltas() if with_tools else chat_delta,
            lambda e: chat_logprobs(run.tokenizer, e),
        )
    outcomes = await complete(request, run)
    choices = [
        chat_choice(
            o.index,
            o.text,
            o.finish_reason,
            chat_logprobs(run.tokenizer, o.logprobs) if o.logprobs is not None else None,
        )
        for o in outcomes
    ]
    if with_tools:
        choices = [tools.with_calls(c) for c in choices]
    return JSONResponse(
        completion_body(
            "chat.completion", prepared.request_id, state.model_id, choices, run.usage(), run.diffusion()
        )
    )


@api.post("/v1/completions")
async def completions(request: Request) -> Response:
    state, engine, req = await accept(request, CompletionRequest)
    prompts = await state.offload(completion_prompts, state, engine, req)
    if req.echo:  # scoring a prompt (lm-eval's loglikelihood requests): server/scoring_routes.py
        from dllm_serve.server.scoring_routes import echo_completion

        return await echo_completion(request, state, engine, req, prompts)
    if req.requested_max_tokens == 0:
        raise bad_request("max_tokens must be at least 1 (0 is allowed with echo).", "max_tokens")
    constraint = await state.offload(output_constraint, engine, req)
    prepared = prepare_generation(state, engine, req, prompts, "prompt", "cmpl", constraint)
    run = GenerationRun(state, engine, prepared)
    log.debug("%s: %d prompts, n=%d, %s", prepared.request_id, len(prompts), req.n, prepared.algorithm)
    top = req.logprobs or 0
    if req.stream:
        return stream_response(
            run,
            "text_completion",
            req.include_usage,
            text_delta,
            lambda e: _text_logprobs(run.tokenizer, e, top),
        )
    outcomes = await complete(request, run)
    choices = [
        completion_choice(o.index, o.text, o.finish_reason, _text_logprobs(run.tokenizer, o.logprobs, top))
        for o in outcomes
    ]
    return JSONResponse(
        completion_body(
            "text_completion", prepared.request_id, state.model_id, choices, run.usage(), run.diffusion()
        )
    )


def _text_logprobs(tok, entries: list[TokenLogprob] | None, top: int) -> dict[str, Any] | None:
    return None if entries is None else completion_logprobs(tok, entries, [e.token for e in entries], top)
