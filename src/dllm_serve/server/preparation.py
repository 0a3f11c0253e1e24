"""Request preparation: everything between the HTTP body and the engine requests.

Every model route starts with ``accept`` (a ready engine or 503, the body parsed strictly on the
preparation threads, the model name checked). A generation then renders and tokenizes its prompt
(``chat_prompt`` / ``completion_prompts``, also off the event loop), and ``prepare_generation``
checks the lengths, resolves the decoding parameters (``engine.resolve_params``: request >
checkpoint > preset defaults; a ``ParamError`` is a 400 naming the field) and builds one engine
request per choice (``n``; seed+i per choice when a seed is given).

Request-level features that change what the engine is asked to do (a response format, tools, a
prompt rewrite) belong here, so the handlers in ``routes.py`` stay a list of steps.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from dllm_serve.engine.algorithms import ParamError
from dllm_serve.engine.engine import EngineBase
from dllm_serve.engine.grammar import Grammar
from dllm_serve.engine.sequence import GenerationRequest, canvas_length
from dllm_serve.protocol import (
    DEFAULT_MAX_TOKENS,
    ChatMessage,
    CompletionRequest,
    UnsupportedFieldError,
    strip_unsupported,
)
from dllm_serve.protocol_responses import new_id
from dllm_serve.server import structured, tools
from dllm_serve.server.errors import APIError, bad_request, from_validation_error
from dllm_serve.server.prompts import check_fits

if TYPE_CHECKING:
    from dllm_serve.server.state import ServerState

Body = TypeVar("Body", bound=BaseModel)


# ------------------------------------------------------------------------------ every route


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")


async def accept(request: Request, schema: type[Body]) -> tuple[ServerState, EngineBase, Body]:
    """The start of every model route: the engine (503 while not ready), the body parsed strictly
    into ``schema`` (400 naming the field), and a 404 for a ``model`` this server does not serve."""
    state = server_state(request)
    engine = state.ready_engine()
    body = await state.offload(decode_body, await request.body(), schema)
    name = getattr(body, "model", None)
    if name and name != state.model_id:
        raise model_not_found(name)
    return state, engine, body


def decode_body(raw: bytes, schema: type[Body]) -> Body:
    """JSON -> ``schema``; every malformed body is a 400 in OpenAI's shape."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad_request("The request body is not valid JSON.", code="invalid_json") from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return schema.model_validate(strip_unsupported(body))
    except UnsupportedFieldError as exc:
        raise bad_request(str(exc), exc.param, "unsupported_parameter") from None
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply.", code="invalid_json") from None


# ------------------------------------------------------------------------------ prompts


class GenerationBody(Protocol):
    """What preparation reads from a generation request (chat, completions, responses)."""

    @property
    def n(self) -> int: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def stop(self) -> list[str]: ...
    @property
    def stream_mode(self) -> str: ...
    @property
    def requested_logprobs(self) -> int | None: ...
    @property
    def requested_max_tokens(self) -> int | None: ...
    @property
    def algorithm_name(self) -> str | None: ...
    def decode_overrides(self) -> dict[str, Any]: ...


class ChatBody(GenerationBody, Protocol):
    @property
    def messages(self) -> list[ChatMessage]: ...


def chat_prompt(state: ServerState, engine: EngineBase, req: ChatBody) -> list[int]:
    """The conversation rendered with the checkpoint's chat template (or joined as plain text when
    it has none or templating is off) and tokenized. Runs on the preparation threads."""
    tok = engine.loaded.tokenizer
    messages, tool_specs = tools.template_messages(req, tok)
    plain = not state.config.allow_special_tokens_in_content
    if state.config.use_chat_template and tok.has_chat_template:
        try:
            rendered = tok.render_chat_text(messages, plain, tools=tool_specs)
        except Exception:  # a template that rejects this conversation (e.g. role order)
            raise bad_request("The chat template cannot render these messages.", "messages") from None
        check_fits(state, tok.min_tokens(rendered.plain()), req, "messages")
        return tok.encode_chat(rendered)
    text = "\n".join(m["content"] for m in messages)
    check_fits(state, tok.min_tokens(text), req, "messages")
    return tok.encode_plain(text) if plain else tok.encode(text)


def completion_prompts(state: ServerState, engine: EngineBase, req: CompletionRequest) -> list[list[int]]:
    """Each prompt's token ids (text tokenized, ids range-checked). Runs on the preparation threads."""
    tok = engine.loaded.tokenizer
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


# ------------------------------------------------------------------------------ engine requests


def output_constraint(engine: EngineBase, req: GenerationBody) -> Grammar | None:
    """The request's compiled output constraint (response_format, guided_*, a forced tool call),
    or None. Runs on the preparation threads (server/structured.py)."""
    return structured.compile_constraint(engine, req, req.requested_max_tokens or DEFAULT_MAX_TOKENS)


@dataclasses.dataclass
class Prepared:
    """A validated generation: prompts, their per-choice engine requests, the resolved algorithm."""

    request_id: str
    prompts: list[list[int]]
    requests: list[GenerationRequest]
    algorithm: str
    stop: list[str]
    denoise: bool = False  # stream_mode "denoise": each engine step is streamed too


def prepare_generation(
    state: ServerState,
    engine: EngineBase,
    req: GenerationBody,
    prompts: list[list[int]],
    prompt_param: str,
    prefix: str,
    constraint: Grammar | None = None,
) -> Prepared:
    """Lengths checked, parameters resolved, one ``GenerationRequest`` per prompt and choice (each
    with its own matcher of ``constraint``)."""
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
    if constraint is not None and params.editing_threshold is not None:
        raise bad_request(
            f"Structured output and forced tool calls are not supported with token editing (the "
            f"{params.algorithm!r} algorithm re-edits committed tokens, which the grammar does not "
            "check); use the llada2 or llada2_speed preset, or send the request without the constraint.",
            "algorithm",
            "invalid_value",
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
                    constraint=structured.row(constraint),
                )
            )
    return Prepared(request_id, prompts, requests, params.algorithm, req.stop, denoise)
