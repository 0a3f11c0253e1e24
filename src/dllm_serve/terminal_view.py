"""`dllm-serve generate --show`: the canvas unmasking live in a terminal, redrawn in place.

The request runs with the engine's denoise trace (engine/denoise.py); after each step the canvas is
drawn with ANSI escapes: committed tokens coloured by the step that committed them (blue early,
orange late), masked positions as the model's current guess, dim, or ``·`` before it has one, the
active block underlined. The view caps itself to the terminal's height and redraws at most
``MAX_FPS`` times a second (the last state always). Not on a terminal, ``generate`` prints plain text.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from typing import TextIO

from dllm_serve.engine.denoise import DenoiseStep
from dllm_serve.engine.engine import Engine, RequestResult
from dllm_serve.engine.sequence import GenerationRequest, SequenceEvent

MAX_FPS = 30
# xterm-256 colours from blue (early commits) over cyan and green to orange (late commits).
STEP_COLOURS = (33, 39, 45, 51, 49, 48, 84, 120, 156, 192, 228, 221, 215, 209)
SPECIAL_NAMES = {"<|endoftext|>": "EOS", "<|eot_id|>": "EOT", "<|im_end|>": "EOT"}
CSI = "\x1b["


class TerminalCanvas:
    """What the canvas looks like now, and its drawing on ``out`` (a terminal)."""

    def __init__(self, tokenizer, out: TextIO) -> None:
        self._hf = tokenizer.hf
        self.out = out
        self.pieces: dict[int, str] = {}
        self.committed: dict[int, int] = {}  # position -> step that committed it
        self.guesses: dict[int, str] = {}
        self.last: DenoiseStep | None = None
        self._lines = 0
        self._drawn_at = 0.0

    def piece(self, token: int) -> str:
        text = self._hf.decode([token], skip_special_tokens=False)
        if text in SPECIAL_NAMES:
            return f"[{SPECIAL_NAMES[text]}]"
        return text.replace("\n", "⏎").replace("\t", "⇥") or "∅"

    def update(self, step: DenoiseStep) -> None:
        self.last = step
        for pos, token, _conf in step.committed:
            self.pieces[pos] = self.piece(token)
            self.committed[pos] = step.step
            self.guesses.pop(pos, None)
        for pos, token, _conf in step.guesses:
            self.guesses[pos] = self.piece(token)
        now = time.monotonic()
        if now - self._drawn_at >= 1 / MAX_FPS:
            self.draw()
            self._drawn_at = now

    def render(self, width: int) -> list[str]:
        """The canvas as lines of at most ``width`` visible characters, with ANSI colours."""
        s = self.last
        if s is None:
            return []
        head = f"step {s.step}  block {s.block}  {len(self.committed)}/{s.canvas_length} committed" + (
            "  (cache refresh)" if s.refresh else ""
        )
        lines, line, used = [head], "", 0
        for pos in range(s.canvas_length):
            active = s.block_start <= pos < s.block_start + s.block_length
            if pos in self.committed:
                text = self.pieces[pos]
                age = (self.committed[pos] - 1) / max(1, s.step - 1)  # 0 first step .. 1 this one
                style = f"38;5;{STEP_COLOURS[round(age * (len(STEP_COLOURS) - 1))]}"
            else:
                text = self.guesses.get(pos, "·")
                style = "2"
            if active:
                style += ";4"
            text = text[: max(1, width - 1)]
            if used + len(text) > width:
                lines.append(line)
                line, used = "", 0
            line += f"{CSI}{style}m{text}{CSI}0m"
            used += len(text)
        lines.append(line)
        return lines

    def draw(self) -> None:
        size = shutil.get_terminal_size()
        lines = self.render(size.columns)[: max(1, size.lines - 1)]
        if self._lines:
            self.out.write(f"{CSI}{self._lines}F")  # back to the first line drawn last time
        self.out.write(f"{CSI}J" + "\n".join(lines) + "\n")
        self.out.flush()
        self._lines = len(lines)


def generate_with_view(engine: Engine, request: GenerationRequest, out: TextIO) -> RequestResult:
    """Run one request on the caller's thread, drawing each step; returns its result."""
    view = TerminalCanvas(engine.loaded.tokenizer, out)
    result = RequestResult([], "", False, 0)

    def sink(event: SequenceEvent) -> None:
        result.add(event)
        if event.denoise is not None:
            view.update(event.denoise)

    engine.scheduler.submit(dataclasses.replace(request, denoise=True), sink, ignore_queue_limit=True)
    while engine.step():
        pass
    view.draw()
    return result
