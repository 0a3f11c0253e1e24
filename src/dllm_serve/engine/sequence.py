"""A request as the engine sees it, the events it emits, and one sequence's decoding state.

The canvas is prompt + ``gen_length`` mask tokens. Blocks are decoded left to right; inside a
block the commit rule picks positions. Whenever the committed left-to-right prefix of the
generation grows, the new tokens are emitted (text streams while later positions are still masked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dllm_serve.engine.algorithms import DecodeParams
from dllm_serve.engine.constrained import RowConstraint
from dllm_serve.engine.denoise import DenoiseStep, DenoiseTrace
from dllm_serve.engine.kv_cache import Extent

# Cache policies that decode block by block over a cached committed context.
BLOCK_CACHES = ("committed", "aligned")


@dataclass
class GenerationRequest:
    """What the server hands the engine: token ids and fully resolved decoding parameters.

    ``logprobs``: None, or how many top alternatives to report with each generated token's
    log-probability (0: the token's own only). ``constraint``: the grammar the output must satisfy
    (engine/constrained.py), one per choice.
    """

    request_id: str
    prompt_ids: list[int]
    params: DecodeParams
    max_new_tokens: int
    denoise: bool = False  # stream each step's provisional state (engine/denoise.py)
    logprobs: int | None = None
    constraint: RowConstraint | None = None


@dataclass
class TokenLogprob:
    """A token's log-probability and the top (token id, log-probability) pairs at its position."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class SequenceEvent:
    """Output of one engine iteration for one request.

    ``token_ids``: newly committed tokens extending the returned prefix (stop token excluded).
    ``finish_reason``: None while running; "stop" (a stop token), "length", "abort" (cancelled) or
    "error" (``error`` says what, without internals). ``stopped_on_token`` is True when a stop
    token ended it (usage counts it). ``forwards`` (model forwards the sequence took) is set on the
    final event only. ``denoise`` (requests that asked for it) is one step's provisional state;
    such an event comes before that step's token event.
    ``logprobs`` (requests that ask): one entry per token of ``token_ids``.
    """

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None
    stopped_on_token: bool = False
    error: str | None = None
    forwards: int = 0
    prompt_tokens: int = 0
    denoise: DenoiseStep | None = None
    logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ForwardPlan:
    """The span of the canvas one iteration feeds the model, and what it attends to.

    Queries are canvas positions [q_start, q_end). Query position i sees keys [0, key_limit[i]).
    Logits are wanted for canvas positions [logits_start, logits_end) (the active block).
    ``refresh`` marks forwards that rebuild the cache (block starts, warm-up steps).
    """

    q_start: int
    q_end: int
    key_limit: torch.Tensor
    logits_start: int
    logits_end: int
    refresh: bool


@dataclass
class Sequence:
    """Decoding state of one request. Lives on the engine thread only."""

    request: GenerationRequest
    canvas: torch.Tensor  # [prompt + gen_length] long, on the engine device
    mask_id: int
    stop_ids: tuple[int, ...]
    generator: torch.Generator
    block: int = 0
    step_in_block: int = 0
    emitted: int = 0  # generated tokens already sent
    forwards: int = 0
    kv: Extent | None = None  # the sequence's KV-cache extent, when the policy caches
    finish_reason: str | None = None
    pending_finish: str | None = None  # output is final; set before the canvas finishes (no early stop)
    stopped_on_token: bool = False
    cancelled: bool = False
    error: str | None = None
    rule_state: torch.Tensor | None = None  # a stateful rule's state (credit), reset at each block
    committed_context: int = 0  # canvas positions whose clean K/V is cached (committed cache)
    draft: torch.Tensor | None = None  # speculative decoding's drafted block (engine/causal_modes.py)
    trace: DenoiseTrace | None = None  # set when the request streams its denoising steps
    token_logprobs: dict[int, TokenLogprob] = field(default_factory=dict)  # canvas position -> its commit's
    _events: list[SequenceEvent] = field(default_factory=list)

    @property
    def extent(self) -> Extent:
        """The KV-cache extent of a sequence whose policy caches (admission gave it one)."""
        if self.kv is None:
            raise RuntimeError(f"{self.request.request_id} has no KV extent")
        return self.kv

    @property
    def params(self) -> DecodeParams:
        return self.request.params

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def output_end(self) -> int:
        """Canvas position just past the last token the output may return (``max_tokens``)."""
        return self.prompt_len + self.request.max_new_tokens

    @property
    def length(self) -> int:
        return self.canvas.shape[0]

    @property
    def origin(self) -> int:
        """Canvas position where block 0 starts: right after the prompt, or (``aligned``)
        the start of the block, at absolute positions, that holds the first generated token."""
        return block_origin(self.prompt_len, self.params)

    @property
    def num_blocks(self) -> int:
        """Blocks of the canvas: ``params.num_blocks``, one more under ``aligned`` when the first
        block starts inside the prompt (a speculative canvas's slack is no block)."""
        return (canvas_length(self.prompt_len, self.params) - self.origin) // self.params.block_length

    @property
    def block_start(self) -> int:
        return self.origin + self.block * self.params.block_length

    @property
    def block_end(self) -> int:
        return self.block_start + self.params.block_length

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def masked_in_block(self) -> torch.Tensor:
        return self.canvas[self.block_start : self.block_end] == self.mask_id

    def floor_commits(self, masked: int) -> int:
        """Commits this step must make at least.

        Under a step budget (the schedule rule's steps, or ``max_steps_per_block``): the linear
        schedule over the steps left, which reproduces LLaDA's split exactly (the remainder goes to
        the first steps) and keeps a threshold-style rule within the budget. Without one: the most
        confident position only, as Fast-dLLM's and dInfer's threshold decoders commit.
        """
        budget = self.params.step_budget
        if budget is None:
            return min(masked, 1)
        if self.params.cache == "aligned":
            return min(masked, sdar_share(self.params.block_length, budget, self.step_in_block))
        return min(masked, math.ceil(masked / max(1, budget - self.step_in_block)))

    def plan(self) -> ForwardPlan:
        """Which span to forward this iteration under the sequence's cache policy."""
        p = self.params
        bs, be, n = self.block_start, self.block_end, self.length
        first = self.step_in_block == 0
        if p.cache == "none":
            return _plan(0, n, n, bs, be, refresh=False)
        if p.cache == "prefix":
            return _plan(0, n, n, bs, be, refresh=True) if first else _plan(bs, n, n, bs, be, refresh=False)
        if p.cache == "dual":
            return _plan(0, n, n, bs, be, refresh=True) if first else _plan(bs, be, n, bs, be, refresh=False)
        if p.cache == "vicinity":
            if self.step_in_block < max(1, p.warmup_steps):
                return _plan(0, n, n, bs, be, refresh=True)
            return _plan(max(0, bs - p.prefix_look), min(n, be + p.after_look), n, bs, be, refresh=False)
        if p.cache in BLOCK_CACHES:
            return self.committed_plan()
        raise ValueError(f"unknown cache policy {p.cache!r}")

    def committed_plan(self) -> ForwardPlan:
        """Block diffusion: the active block attends to the cached committed context and itself.

        Context not yet cached (the prompt, then each block once it completes) is forwarded
        together with the next block; each query sees keys up to the end of its own block, so
        the context's K/V are exactly those of a block-causal pass. Under ``committed`` the prompt
        is cut into blocks of ``block_length`` from position 0, as the published checkpoints are
        trained (block index = position // block size), its last, partial block seeing the whole
        prompt; generation blocks follow from the prompt's end. A full prompt block's K/V thus
        depend only on the tokens up to its end, which lets later requests with the same prefix
        reuse them (``engine/prompt_cache.py``; ``committed_context`` then starts past the reused
        blocks). Under ``aligned`` (SDAR) every block sits at absolute positions: the prompt's
        last, partial block is the first generation block, which starts with its last tokens.
        """
        bs, be = self.block_start, self.block_end
        start = self.committed_context
        limits = torch.full((be - start,), be, dtype=torch.long)
        if start < bs and self.params.cache == "aligned":  # absolute blocks, the prompt's too
            bl = self.params.block_length
            limits[: bs - start] = (torch.arange(start, bs) // bl + 1) * bl
        elif start < bs:
            prompt = self.prompt_len
            pos = torch.arange(start, bs)
            bl = self.params.block_length
            block_of = torch.where(
                pos < prompt,
                ((pos // bl + 1) * bl).clamp(max=prompt),
                prompt + ((pos - prompt) // bl + 1) * bl,
            )
            limits[: bs - start] = block_of
        return ForwardPlan(start, be, limits, bs, be, refresh=start < bs)

    def push(self, event: SequenceEvent) -> None:
        self._events.append(event)

    def pop_events(self) -> list[SequenceEvent]:
        events, self._events = self._events, []
        return events


def block_origin(prompt_len: int, params: DecodeParams) -> int:
    """Where block 0 starts (see ``Sequence.origin``)."""
    if params.cache == "aligned":
        return prompt_len // params.block_length * params.block_length
    return prompt_len


def canvas_length(prompt_len: int, params: DecodeParams) -> int:
    """Prompt + canvas tokens a request holds: ``gen_length`` masks, and under ``aligned`` as
    many more as it takes to end on a block boundary (fewer than ``block_length``)."""
    end = prompt_len + params.gen_length
    return end + (-(end - block_origin(prompt_len, params)) % params.block_length)


def sdar_share(block_length: int, steps: int, step: int) -> int:
    """SDAR's commits at step ``step`` of a block: ``block_length`` split evenly over ``steps``,
    the remainder to the first steps; at least one (more steps than tokens commit one per step)."""
    base, extra = divmod(block_length, steps)
    return max(1, base + int(step < extra))


def _plan(qs: int, qe: int, keys: int, ls: int, le: int, *, refresh: bool) -> ForwardPlan:
    return ForwardPlan(qs, qe, torch.full((qe - qs,), keys, dtype=torch.long), ls, le, refresh)
