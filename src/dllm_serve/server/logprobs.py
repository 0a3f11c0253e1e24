"""OpenAI's two ``logprobs`` shapes, built from the engine's per-token entries.

Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}``.
Completions (legacy): ``{"tokens", "token_logprobs", "top_logprobs": [{text: logprob}], "text_offset"}``.
A token's text is the token decoded alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dllm_serve.engine.sequence import TokenLogprob


def _text(tok, token: int) -> str:
    return tok.hf.decode([token])


def chat_logprobs(tok, entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        text = _text(tok, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(
    tok, entries: Sequence[TokenLogprob | None], tokens: list[int], top: int, offset: int = 0
) -> dict[str, Any]:
    """``entries`` parallel to ``tokens`` (None: no log-probability, e.g. a prompt's first token);
    ``top`` alternatives per token (0: none); ``offset``: characters before the first token."""
    pieces = [_text(tok, t) for t in tokens]
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    return {
        "tokens": pieces,
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": [None if e is None or not top else _top_dict(tok, e.top[:top]) for e in entries],
        "text_offset": offsets,
    }


def _top_dict(tok, top: list[tuple[int, float]]) -> dict[str, float]:
    """Alternatives keyed by text; tokens that decode alike keep the most probable's value."""
    out: dict[str, float] = {}
    for t, lp in top:
        out.setdefault(_text(tok, t), lp)
    return out
