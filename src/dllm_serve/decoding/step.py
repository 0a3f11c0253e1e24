"""The decoding step: from one forward's logits to each row's chosen tokens and commit mask.

``decide`` is the engine runner's only decoding call. It is a function of its arguments (the
logits, which it edits in place, the active block, and one ``RowStep`` per row) plus the rows'
random generators; rules, samplers and confidence measures are looked up by name in
decoding/registry.py. Every branch is decided from host values, so nothing waits for the device.

Per row, in order: EOS ban (``logits_eos_inf``), the row's constraint (structured output), nucleus
filter, stateful rules' logit edits (credit), the token choice (argmax, or Gumbel-max at
temperature > 0 with noise from the row's generator), the confidence ranked (with the EOS/EOT ban
of ``confidence_eos_eot_inf``), and the commit rule over the linear-schedule floor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from dllm_serve.decoding import dream, rules
from dllm_serve.decoding.confidence import confidence
from dllm_serve.decoding.registry import REMASKING, RULES
from dllm_serve.decoding.sampling import gumbel_argmax, never_choosing, top_p_filter, uniform
from dllm_serve.tensors import upload

# (logits [width, vocab], block tokens [width], still-masked positions [width]) -> edited logits,
# e.g. -inf for tokens a grammar forbids at a position. Runs on the device, before the choice.
Constraint = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class StepParams(Protocol):
    """The decoding parameters a step reads (``engine.algorithms.DecodeParams`` has them all)."""

    @property
    def rule(self) -> str: ...
    @property
    def remasking(self) -> str: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def logits_eos_inf(self) -> bool: ...
    @property
    def confidence_eos_eot_inf(self) -> bool: ...
    @property
    def top_k(self) -> int: ...
    @property
    def alg_temp(self) -> float: ...
    @property
    def eps(self) -> float: ...


@dataclass(frozen=True)
class NoiseSpan:
    """Where a row's random draws come from: its own generator, drawing ``length`` rows of noise per
    step of which ``[offset, offset + width)`` is used. The reference LLaDA sampler draws over the
    whole canvas (``length`` = canvas, ``offset`` = block start); the others over the block."""

    generator: torch.Generator
    length: int
    offset: int = 0


@dataclass(frozen=True)
class RowStep:
    """One row's inputs to a decoding step."""

    params: StepParams
    width: int  # the row's block length (its positions in the block tensor; the rest is padding)
    floor: int  # commits this step must make at least (Sequence.floor_commits)
    noise: NoiseSpan
    state: torch.Tensor | None = None  # a stateful rule's state; None at a block start
    constraint: Constraint | None = None
    step: int = 0  # the step within the block (Dream's rules: their timestep)
    steps: int = 1  # the steps per block (Dream's rules)
    masked: tuple[int, ...] = ()  # Dream's rules: the block's masked positions, from the host


@dataclass
class StepResult:
    tokens: torch.Tensor  # [B, P] the token chosen at every position
    commit: torch.Tensor  # [B, P] bool, the positions committed this step
    conf: torch.Tensor  # [B, P] the confidence the rule ranked
    states: list[torch.Tensor | None]  # per row: the stateful rule's new state (None otherwise)


def decide(
    logits: torch.Tensor,
    *,
    block: torch.Tensor,
    rows: Sequence[RowStep],
    mask_id: int,
    eos_id: int,
    eot_id: int | None,
) -> StepResult:
    """Tokens, commits and confidences for a batch of rows, each with its own parameters.

    ``logits`` [B, P, vocab] (float32, consumed: edited in place, since copying it costs as much
    as the edits), ``block`` [B, P] the active blocks on the device.
    """
    own = [i for i, r in enumerate(rows) if r.params.rule in dream.DREAM_RULES]
    if own:
        return _with_dream_rows(logits, block, rows, own, mask_id, eos_id, eot_id)
    dev = logits.device
    params = [r.params for r in rows]
    candidates = block == mask_id
    _ban(logits, [p.logits_eos_inf for p in params], eos_id)
    for i, r in enumerate(rows):
        if r.constraint is not None:
            logits[i, : r.width] = r.constraint(
                logits[i, : r.width], block[i, : r.width], candidates[i, : r.width]
            )
    logits = top_p_filter(logits, [p.top_p for p in params])
    states: list[torch.Tensor | None] = [None] * len(rows)
    for rule in RULES.values():
        if rule.stateful and any(p.rule == rule.name for p in params):
            logits = _edit_logits(rule.name, logits, candidates, rows, states)

    vocab = logits.shape[-1]
    drawn: dict[int, torch.Tensor] = {}
    with never_choosing(logits, mask_id):
        tokens = logits.argmax(dim=-1)
        for i, (r, p) in enumerate(zip(rows, params, strict=True)):
            n, span = r.width, r.noise
            if p.temperature > 0:
                noise = uniform(span.generator, (span.length, vocab), dev)[span.offset : span.offset + n]
                tokens[i, :n] = gumbel_argmax(logits[i, :n], p.temperature, noise)
            if REMASKING[p.remasking].drawn:
                draws = torch.rand((span.length,), generator=span.generator, device=dev)
                drawn[i] = draws[span.offset : span.offset + n]

    # Tokens are chosen; from here on logits only rank confidence.
    conf_logits = _ban_in_confidence(logits, params, eos_id, eot_id)
    measure = [REMASKING[p.remasking].measure or 0 for p in params]
    conf = confidence(conf_logits.softmax(-1), tokens, measure)
    for i, draws in drawn.items():
        conf[i, : draws.shape[0]] = draws.to(conf.dtype)

    names = [p.rule for p in params]
    floor = upload([r.floor for r in rows], dev, torch.long)
    commit = select_commits(conf, candidates, floor, names, _row_params(names, rows, dev))
    return StepResult(tokens, commit, conf, states)


def _with_dream_rows(
    logits: torch.Tensor,
    block: torch.Tensor,
    rows: Sequence[RowStep],
    own: list[int],
    mask_id: int,
    eos_id: int,
    eot_id: int | None,
) -> StepResult:
    """Rows under Dream's rules (their own token choice and counts, decoding/dream.py) beside the
    others (``decide``), assembled into one result."""
    dev = logits.device
    shape = block.shape
    tokens = torch.empty(shape, dtype=torch.long, device=dev)
    commit = torch.empty(shape, dtype=torch.bool, device=dev)
    conf = torch.empty(shape, dtype=torch.float32, device=dev)
    states: list[torch.Tensor | None] = [None] * len(rows)
    for i in own:  # a grammar's mask applies before Dream's token choice too
        r = rows[i]
        if r.constraint is not None:
            n = r.width
            logits[i, :n] = r.constraint(logits[i, :n], block[i, :n], block[i, :n] == mask_id)
    index = upload(own, dev, torch.long)
    t, c, f = dream.decide_rows(logits[index], [rows[i] for i in own], mask_id)
    tokens[index], commit[index], conf[index] = t, c, f
    others = [i for i in range(len(rows)) if i not in own]
    if others:
        rest = upload(others, dev, torch.long)
        sub = decide(
            logits[rest],
            block=block[rest],
            rows=[rows[i] for i in others],
            mask_id=mask_id,
            eos_id=eos_id,
            eot_id=eot_id,
        )
        tokens[rest], commit[rest], conf[rest] = sub.tokens, sub.commit, sub.conf.float()
        for k, i in enumerate(others):
            states[i] = sub.states[k]
    return StepResult(tokens, commit, conf, states)


def select_commits(
    conf: torch.Tensor,
    candidates: torch.Tensor,
    floor: torch.Tensor,
    rule: Sequence[str],
    params: dict[str, torch.Tensor],
) -> torch.Tensor:
    """The commit mask [B, P] for rows with different rules: the floor, plus what each row's rule
    selects. ``rule`` names each row's rule (a host list, so which rules run is known without
    waiting for the device); ``params`` holds the per-row tensors the present rules take."""
    commit = rules.top_k_mask(conf, candidates, floor)
    present = [RULES[name] for name in dict.fromkeys(rule)]
    if all(r.select is None for r in present):
        return commit
    index = {r.name: k for k, r in enumerate(RULES.values())}
    rows = upload([index[name] for name in rule], conf.device, torch.long)[:, None]
    for r in present:
        if r.select is None:
            continue
        picked = r.select(conf, candidates, **{name: params[name] for name in r.params})
        commit = commit | (picked & (rows == index[r.name]))
    return commit


def _row_params(names: list[str], rows: Sequence[RowStep], device: torch.device) -> dict[str, torch.Tensor]:
    """Per-row float32 tensors of the parameters the present rules select with."""
    wanted = dict.fromkeys(p for name in dict.fromkeys(names) for p in RULES[name].params)
    return {p: upload([float(getattr(r.params, p)) for r in rows], device, torch.float32) for p in wanted}


def _edit_logits(
    name: str,
    logits: torch.Tensor,
    candidates: torch.Tensor,
    rows: Sequence[RowStep],
    states: list[torch.Tensor | None],
) -> torch.Tensor:
    """A stateful rule's rows: their state updated and their logits edited (in place)."""
    rule = RULES[name]
    assert rule.edit_logits is not None
    picked = [i for i, r in enumerate(rows) if r.params.rule == name]
    sub = logits[picked]
    width, vocab = sub.shape[1], sub.shape[2]
    state = torch.stack(
        [
            own if (own := rows[i].state) is not None else torch.zeros((width, vocab), device=logits.device)
            for i in picked
        ]
    )[:, :width]
    args = {
        p: upload([float(getattr(rows[i].params, p)) for i in picked], logits.device, torch.float32)
        for p in rule.state_params
    }
    edited, state = rule.edit_logits(sub, candidates[picked], state, **args)
    for k, i in enumerate(picked):
        states[i] = state[k]
    logits[picked] = edited
    return logits


def _ban(logits: torch.Tensor, flagged: list[bool], token: int | None) -> torch.Tensor:
    """Set ``token``'s logit to -inf, in place, in the flagged rows; returns ``logits``."""
    if token is not None and any(flagged):
        rows = upload(flagged, logits.device, torch.bool)[:, None]
        logits[..., token].masked_fill_(rows, float("-inf"))
    return logits


def _ban_in_confidence(
    logits: torch.Tensor, params: Sequence[StepParams], eos_id: int, eot_id: int | None
) -> torch.Tensor:
    """``confidence_eos_eot_inf`` with the effect of ML-GSAI's published ``generate``.

    There one chained assignment sets EOS to -inf in the noisy logits and EOT in the raw logits,
    after the tokens are chosen; the confidence is the softmax of the raw logits. At temperature 0
    the noisy logits are the raw logits (the same tensor), so both EOS and EOT leave the
    confidence; at temperature > 0 the noisy tensor is a float64 copy that nothing reads
    afterwards, so only EOT does. Either way a position whose chosen token is banned gets
    confidence 0, and the others are renormalised without the banned tokens.
    """
    flags = [p.confidence_eos_eot_inf for p in params]
    logits = _ban(logits, flags, eot_id)
    at_zero = [f and p.temperature == 0 for f, p in zip(flags, params, strict=True)]
    return _ban(logits, at_zero, eos_id)
