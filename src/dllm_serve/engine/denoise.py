"""The denoising process of one request, step by step, for requests that ask to watch it.

A request with ``GenerationRequest.denoise`` set gets a ``DenoiseTrace`` on its sequence. After
each of its engine steps the runner reads back that row's provisional state (every block
position's current top token and the commit rule's confidence in it: one extra small transfer
per step, and only for such rows; the others keep one device sync per forward) and the trace
turns it into a ``DenoiseStep`` holding only what changed: positions committed this step and
masked positions whose guess or confidence moved. The server turns those into SSE fields
(server/denoise_stream.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from dllm_serve.engine.algorithms import DecodeParams
from dllm_serve.tensors import upload


class Traced(Protocol):
    """What a trace reads of a sequence (engine/sequence.py's ``Sequence``, which holds the trace)."""

    canvas: torch.Tensor
    mask_id: int
    block: int
    trace: DenoiseTrace | None

    @property
    def params(self) -> DecodeParams: ...

    @property
    def prompt_len(self) -> int: ...

    @property
    def block_start(self) -> int: ...

    @property
    def length(self) -> int: ...


CONF_DIGITS = 3  # a masked position's confidence is resent once it moves at this precision


@dataclass
class DenoiseStep:
    """One engine step of one sequence; positions are offsets into the generated canvas.

    ``committed``: (position, token id, confidence) committed by this step. ``guesses``: (position,
    token id, confidence) for masked positions of the active block whose top token or rounded confidence
    changed since the previous step (all of them on a block's first step).
    """

    step: int  # the sequence's engine steps so far, this one included (1-based)
    block: int
    block_start: int
    block_length: int
    canvas_length: int
    refresh: bool  # this forward rebuilt the KV cache (block start, warm-up, context)
    committed: list[tuple[int, int, float]]
    guesses: list[tuple[int, int, float]]


@dataclass
class DenoiseTrace:
    """Per-sequence memory of the last guesses sent, so each step sends changes only."""

    steps: int = 0
    _sent: dict[int, tuple[int, float]] = field(default_factory=dict)

    def observe(
        self, seq: Traced, new_block: torch.Tensor, provisional: torch.Tensor, refresh: bool
    ) -> DenoiseStep:
        """Compare the block before (``seq.canvas``, not yet updated) with ``new_block`` (host).

        ``provisional`` is the row's read-back, [2, block_length] float64: top token ids, confidences.
        """
        self.steps += 1
        bs, bl = seq.block_start, seq.params.block_length
        offset = bs - seq.prompt_len
        before = seq.canvas[bs : bs + bl].tolist()
        after = new_block[:bl].tolist()
        ids = provisional[0, :bl].long().tolist()
        conf = provisional[1, :bl].tolist()
        committed = []
        guesses = []
        for i in range(bl):
            pos = offset + i
            if before[i] != seq.mask_id:
                continue
            if after[i] != seq.mask_id:
                committed.append((pos, after[i], _rounded(conf[i])))
                self._sent.pop(pos, None)
                continue
            guess = (ids[i], _rounded(conf[i]))
            if self._sent.get(pos) != guess:
                self._sent[pos] = guess
                guesses.append((pos, *guess))
        first = max(offset, 0)  # an ``aligned`` (SDAR) block may start inside the prompt
        return DenoiseStep(
            step=self.steps,
            block=seq.block,
            block_start=first,
            block_length=offset + bl - first,
            canvas_length=seq.length - seq.prompt_len,
            refresh=refresh,
            committed=committed,
            guesses=guesses,
        )


def _rounded(conf: float) -> float:
    """JSON-safe: a non-finite score (a rule's -inf ban) is sent as 0."""
    return round(conf, CONF_DIGITS) if math.isfinite(conf) else 0.0


def read_back(seqs: list[Traced], tokens: torch.Tensor, conf: torch.Tensor) -> dict[int, torch.Tensor]:
    """Rows (by index) that trace their denoising -> [2, width] float64 host tensor (ids, confidence).

    Empty, with no device work at all, when no row asks; otherwise one transfer for all of them.
    Token ids are exact in float64.
    """
    rows = [i for i, s in enumerate(seqs) if s.trace is not None]
    if not rows:
        return {}
    index = upload(rows, tokens.device, torch.long)
    host = torch.stack([tokens[index].double(), conf[index].double()], dim=1).cpu()
    return dict(zip(rows, host, strict=True))
