"""OpenAI response bodies (chat completions, completions, their stream chunks) and the diffusion
extension object, built from plain values.

The request schemas live in ``protocol.py``; this module is their answer side. It knows nothing of
the engine or of HTTP: the routes (``server/``) pass texts, finish reasons, counts and already
formatted ``logprobs`` objects, so every field name of a response is written in one place.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

CompletionObject = Literal["chat.completion", "text_completion"]
ChunkObject = Literal["chat.completion.chunk", "text_completion"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def diffusion_dict(algorithm: str, forwards: int, tokens: int) -> dict[str, Any]:
    """The extension object: how much model work the answer took."""
    return {
        "algorithm": algorithm,
        "forwards": forwards,
        "tokens_per_forward": round(tokens / forwards, 4) if forwards else None,
    }


def chat_choice(index: int, text: str, finish_reason: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    """One choice of a (non-streamed) chat completion."""
    return {
        "index": index,
        "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def completion_choice(
    index: int, text: str, finish_reason: str, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    """One choice of a (non-streamed) text completion."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(
    kind: CompletionObject,
    request_id: str,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, int],
    diffusion: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A whole chat completion or text completion; ``diffusion`` is left out when None (echo)."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": kind,
        "created": now(),
        "model": model,
        "choices": choices,
        "usage": usage,
    }
    if diffusion is not None:
        body["diffusion"] = diffusion
    return body


def chunk_body(
    kind: ChunkObject,
    request_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    include_usage: bool,
    **extra: Any,
) -> dict[str, Any]:
    """One stream chunk; with ``include_usage`` every chunk carries ``usage`` (null until the last)."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": kind,
        "created": created,
        "model": model,
        "choices": choices,
    }
    if include_usage:
        body["usage"] = None
    body.update(extra)
    return body


def chat_delta(
    index: int, text: str | None, finish: str | None, first: bool = False, logprobs: Any = None
) -> dict[str, Any]:
    """A chat chunk's choice: the role first, then content deltas, then the finish reason."""
    delta: dict[str, Any] = {}
    if first:
        delta = {"role": "assistant", "content": "", "refusal": None}
    elif text is not None:
        delta = {"content": text}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def text_delta(
    index: int, text: str | None, finish: str | None, first: bool = False, logprobs: Any = None
) -> dict[str, Any]:
    """A text completion chunk's choice (there is no role chunk: ``first`` is unused)."""
    return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
