"""``stream_mode: "denoise"``: each engine step of a choice as a ``denoise`` field on a stream chunk.

The engine's ``DenoiseStep`` (engine/denoise.py) holds token ids; here each id gets its text (special
tokens by name, so a canvas filling up with end-of-text shows it) and the step becomes compact
JSON arrays. The field rides on an ordinary chunk of the request's stream (``chat.completion.chunk``
with an empty ``delta``, or ``text_completion`` with empty ``text``), so OpenAI clients that ignore
unknown fields read the same text as in ``committed`` mode. docs/playground.md shows an event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dllm_serve.engine.denoise import DenoiseStep


class DenoiseView:
    """One request's step -> JSON converter; each token's text is decoded once."""

    def __init__(self, tokenizer) -> None:
        self._hf = tokenizer.hf
        self._text: dict[int, str] = {}

    def text(self, token: int) -> str:
        if token not in self._text:
            self._text[token] = self._hf.decode([token], skip_special_tokens=False)
        return self._text[token]

    def field(self, step: DenoiseStep) -> dict[str, Any]:
        """``committed`` and ``masked``: [position, token id, text, confidence] each."""
        return {
            "step": step.step,
            "block": step.block,
            "block_start": step.block_start,
            "block_length": step.block_length,
            "canvas_length": step.canvas_length,
            "refresh": step.refresh,
            "committed": [[pos, tok, self.text(tok), conf] for pos, tok, conf in step.committed],
            "masked": [[pos, tok, self.text(tok), conf] for pos, tok, conf in step.guesses],
        }

    def sender(self, put: Callable[[tuple[int, dict[str, Any]]], None]) -> Callable[[int, DenoiseStep], None]:
        """``on_denoise`` for ``run_choice``: puts (choice index, the step's field) with ``put``."""
        return lambda index, step: put((index, self.field(step)))
