"""Likelihood endpoints (docs/evaluation.md), answered by the engine's scoring jobs.

* ``POST /v1/loglikelihood``: Monte-Carlo ELBO scores of continuations. Each item of ``requests``
  becomes one engine scoring request (``engine/scoring.py``); they run concurrently and share
  forwards with each other and with other clients' work. Every item of one HTTP request uses the
  same seed (the request's, or one drawn for it), so candidates of a multiple-choice question are
  compared under common random numbers.
* ``/v1/completions`` with ``echo`` (``max_tokens`` 0 or 1), the form lm-eval's
  ``local-completions`` sends for likelihood tasks: the prompt's per-token log-probabilities (each
  token alone masked), ``top_logprobs`` and, with ``max_tokens`` 1, one greedy token.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import field_validator, model_validator

from dllm_serve.engine.engine import EngineBase
from dllm_serve.engine.scoring import MAX_MC_NUM, ScoringEvent, ScoringRequest, TokenLogprobRequest
from dllm_serve.protocol import ChatMessage, CompletionRequest, _Strict
from dllm_serve.protocol_responses import completion_body, completion_choice, new_id, usage_dict
from dllm_serve.server.auth import require_api_key
from dllm_serve.server.errors import bad_request
from dllm_serve.server.lifecycle import score
from dllm_serve.server.logprobs import completion_logprobs
from dllm_serve.server.preparation import accept

if TYPE_CHECKING:
    from dllm_serve.server.state import ServerState

scoring_api = APIRouter(dependencies=[Depends(require_api_key)])

MAX_ITEMS = 1024  # items per HTTP request


class ScoringItem(_Strict):
    """One (context or messages, continuation) pair; text or token ids."""

    context: str | list[int] | None = None
    messages: list[ChatMessage] | None = None
    continuation: str | list[int]

    @model_validator(mode="after")
    def _one_context(self) -> ScoringItem:
        if (self.context is None) == (self.messages is None):
            raise ValueError("give exactly one of context and messages")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must contain at least one message")
        if not self.continuation:
            raise ValueError("the continuation must not be empty")
        return self


class LoglikelihoodRequest(_Strict):
    model: str | None = None
    requests: list[ScoringItem]
    mc_num: int = 128
    cfg_scale: float | int = 0.0
    seed: int | None = None
    check_greedy: bool = False
    block_length: int | None = None
    object: Literal["loglikelihood"] | None = None

    @field_validator("requests")
    @classmethod
    def _count(cls, value: list[ScoringItem]) -> list[ScoringItem]:
        if not 1 <= len(value) <= MAX_ITEMS:
            raise ValueError(f"requests must hold between 1 and {MAX_ITEMS} items")
        return value

    @field_validator("mc_num")
    @classmethod
    def _mc_num(cls, value: int) -> int:
        if not 1 <= value <= MAX_MC_NUM:
            raise ValueError(f"mc_num must be between 1 and {MAX_MC_NUM}")
        return value

    @field_validator("cfg_scale")
    @classmethod
    def _cfg(cls, value: float) -> float:
        if not 0 <= value <= 100:
            raise ValueError("cfg_scale must be between 0 and 100")
        return float(value)

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value < 2**63:
            raise ValueError("seed must be a non-negative 64-bit integer")
        return value

    @field_validator("block_length")
    @classmethod
    def _block(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("block_length must be a positive integer")
        return value


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a text pair, split where the context's own tokens end.

    Trailing spaces move from the context to the continuation (lm-eval's convention), the pair is
    encoded as one text, and the continuation is what follows the context's tokens; when the
    joint encoding does not start with them, the two texts are encoded separately.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context) if context else []
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, tokenizer.encode(continuation)


def _tokens(engine: EngineBase, item: ScoringItem, index: int) -> tuple[list[int], list[int]]:
    tok = engine.loaded.tokenizer
    vocab = len(tok.hf)
    where = f"requests[{index}]"
    for name, value in (("context", item.context), ("continuation", item.continuation)):
        if isinstance(value, list) and any(t < 0 or t >= vocab for t in value):
            raise bad_request(f"Token ids in {name} must be in [0, {vocab}).", f"{where}.{name}")
    if item.messages is not None:
        if not tok.has_chat_template:
            raise bad_request("This model's tokenizer has no chat template; send a context.", where)
        try:
            context = tok.render_chat([m.template_dict() for m in item.messages])
        except Exception:
            raise bad_request(
                "The chat template cannot render these messages.", f"{where}.messages"
            ) from None
        cont = item.continuation
        return context, cont if isinstance(cont, list) else tok.encode(cont)
    if isinstance(item.context, str) and isinstance(item.continuation, str):
        context, cont = split_pair(tok, item.context, item.continuation)
    else:
        context = item.context if isinstance(item.context, list) else tok.encode(item.context or "")
        cont = item.continuation if isinstance(item.continuation, list) else tok.encode(item.continuation)
    if not cont:
        raise bad_request("The continuation encodes to no tokens.", f"{where}.continuation")
    return context, cont


def scoring_requests(
    state: ServerState, engine: EngineBase, req: LoglikelihoodRequest
) -> list[ScoringRequest]:
    """Validated engine requests for every item (a bad item is a 400 naming it)."""
    defaults = engine.model_defaults
    block = engine.block_diffusion  # the estimator matching its training
    if req.block_length is not None and not block:
        raise bad_request("block_length applies to block-diffusion models only.", "block_length")
    block_length = (req.block_length or int(defaults.get("block_length", 32))) if block else None
    shift = bool(defaults.get("shift_logits", False))
    causal = engine.causal_scoring  # exact: each token from the ones before it
    seed = req.seed if req.seed is not None else secrets.randbits(62)
    rid = new_id("ll")
    out = []
    for i, item in enumerate(req.requests):
        context, cont = _tokens(engine, item, i)
        total = len(context) + len(cont)
        if total > state.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {state.max_model_len} tokens; requests[{i}] has "
                f"{total} ({len(context)} context + {len(cont)} continuation).",
                f"requests[{i}]",
                "context_length_exceeded",
            )
        if (shift or causal) and not context:
            raise bad_request(
                "This checkpoint predicts each token from the one before (shift_logits or causal "
                "scoring): the context must not be empty.",
                f"requests[{i}].context",
            )
        out.append(
            ScoringRequest(
                f"{rid}-{i}",
                context,
                cont,
                mc_num=req.mc_num,
                cfg_scale=float(req.cfg_scale),
                seed=seed,
                check_greedy=req.check_greedy,
                block_length=block_length,
                shift_logits=shift,
                causal=causal,
                aligned=engine.aligned_scoring,
            )
        )
    return out


@scoring_api.post("/v1/loglikelihood")
async def loglikelihood(request: Request) -> JSONResponse:
    state, engine, req = await accept(request, LoglikelihoodRequest)
    _check_native(engine)
    # templating and tokenizing: off the loop
    requests = await state.offload(scoring_requests, state, engine, req)
    events = await score(request, state, engine, requests)
    prompt = sum(len(r.context_ids) + len(r.continuation_ids) for r in requests)
    return JSONResponse(
        {
            "object": "loglikelihood",
            "model": state.model_id,
            "data": [
                {
                    "index": i,
                    "logprob": e.logprob,
                    "stderr": e.stderr,
                    "num_tokens": e.num_tokens,
                    "is_greedy": e.is_greedy,
                    "forwards": e.forwards,
                }
                for i, e in enumerate(events)
            ],
            "usage": usage_dict(prompt, 0),
        }
    )


def _check_native(engine: EngineBase) -> None:
    if not engine.supports_logprobs:
        raise bad_request("Likelihood scoring needs the native engine (not --trust-remote-code).")


def _family_settings(engine: EngineBase) -> tuple[int | None, bool]:
    """(block length of the block-diffusion estimator or None, shift_logits) for the loaded model."""
    defaults = engine.model_defaults
    block = int(defaults.get("block_length", 32)) if engine.block_diffusion else None
    return block, bool(defaults.get("shift_logits", False))


async def echo_completion(
    request: Request, state: ServerState, engine: EngineBase, req: CompletionRequest, prompts: list[list[int]]
) -> JSONResponse:
    """``/v1/completions`` with ``echo``: the prompt (and at most one token), with log-probabilities
    when ``logprobs`` is set."""
    _check_native(engine)
    max_tokens = req.requested_max_tokens if req.requested_max_tokens is not None else 0
    if max_tokens > 1:
        raise bad_request("echo supports max_tokens 0 or 1 (scoring a prompt).", "max_tokens")
    if req.stream:
        raise bad_request("echo is not available with stream.", "stream")
    if req.n != 1:
        raise bad_request("echo supports n = 1 only.", "n")
    for ids in prompts:
        if len(ids) + max_tokens > state.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {state.max_model_len} tokens; the prompt has "
                f"{len(ids)} and max_tokens is {max_tokens}.",
                "prompt",
                "context_length_exceeded",
            )
    tok = engine.loaded.tokenizer
    block, shift = _family_settings(engine)
    rid = new_id("cmpl")
    top_k = req.logprobs or 0
    wanted = req.logprobs is not None or max_tokens > 0
    requests = [
        TokenLogprobRequest(
            f"{rid}-{i}",
            ids,
            score_prompt=req.logprobs is not None,  # text only: the prompt needs no scoring
            top_k=max(1, top_k),
            generate=max_tokens,
            block_length=block,
            shift_logits=shift,
            causal=engine.causal_scoring,
            aligned=engine.aligned_scoring,
        )
        for i, ids in enumerate(prompts)
    ]
    events = (
        await score(request, state, engine, requests)
        if wanted
        else [ScoringEvent(r.request_id, "stop") for r in requests]
    )
    stops = set(engine.stop_ids)
    choices = []
    completion_tokens = 0
    for i, (ids, event) in enumerate(zip(prompts, events, strict=True)):
        generated = event.generated
        completion_tokens += len(generated)
        stopped = bool(generated) and generated[-1].token in stops
        text = _prompt_text(req.prompt[i], tok) + tok.decode(
            [g.token for g in generated if g.token not in stops]
        )
        entries = [*event.tokens[: len(ids)], *generated]
        tokens = [*ids, *(g.token for g in generated)]
        logprobs = completion_logprobs(tok, entries, tokens, top_k) if req.logprobs is not None else None
        choices.append(completion_choice(i, text, "stop" if stopped else "length", logprobs))
    usage = usage_dict(sum(len(p) for p in prompts), completion_tokens)
    return JSONResponse(completion_body("text_completion", rid, state.model_id, choices, usage))


def _prompt_text(prompt: str | list[int], tok) -> str:
    return prompt if isinstance(prompt, str) else tok.decode(prompt)
