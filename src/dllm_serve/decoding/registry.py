"""The decoding table: every commit rule and remasking (confidence) measure by name, with the
parameters it reads and whether it keeps state, and the ``Knob`` metadata every decoding parameter
carries.

Everything else is derived from here and from ``DecodeParams``' knobs (engine/algorithms.py):
parameter validation, the request schema (protocol.py), the ``generate``/``eval`` flags
(commands.py), ``dllm-serve models`` and ``GET /v1/algorithms``, and the decoding step
(decoding/step.py), which runs each rule on the rows that name it. A new rule is its function in
``decoding/rules.py`` and one ``Rule`` line in ``RULES`` (plus a knob in ``DecodeParams`` for each new
parameter); see docs/architecture.md, "Adding a decoding rule".
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from dllm_serve.decoding import rules


@dataclass(frozen=True)
class Knob:
    """How a decoding parameter is checked and described. The range applies to numbers (``low``
    for integers), ``choices`` to strings (a table such as ``RULES``, read when a value is checked);
    the type comes from the field's annotation."""

    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the range excludes ``low``
    choices: Collection[str] = ()


def knob(default: Any, *, help: str, **check: Any) -> Any:
    """A ``DecodeParams`` field that is a request field, a CLI flag and a /v1/algorithms entry."""
    return field(default=default, metadata=knob_metadata(help=help, **check))


def knob_metadata(*, help: str, **check: Any) -> dict[str, Knob]:
    """The metadata of a knob without a default: ``field(metadata=knob_metadata(...))``."""
    return {"knob": Knob(help, **check)}


@dataclass(frozen=True)
class Rule:
    """A commit rule: which masked positions of the active block are committed this step.

    Every rule commits at least the linear schedule's ``floor`` (decoding/rules.py); ``select``
    adds the positions the rule commits beyond it. ``params`` are the ``DecodeParams`` fields
    ``select`` takes as keyword arguments, one value per row (float32 tensors). A ``stateful`` rule
    keeps a tensor per sequence across the steps of a block (zeros ``[block_length, vocab]`` at each
    block start), which ``edit_logits`` updates from the step's logits before the tokens are chosen
    and returns with the edited logits; ``state_params`` are its keyword arguments.
    """

    name: str
    description: str
    select: Callable[..., torch.Tensor] | None = None  # (conf, candidates, **params) -> [B, P] bool
    params: tuple[str, ...] = ()
    fixed_steps: bool = False  # exactly steps / num_blocks forwards per block (max_steps_per_block n/a)
    stateful: bool = False
    edit_logits: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    state_params: tuple[str, ...] = ()

    @property
    def parameters(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.params + self.state_params))


def _threshold(conf: torch.Tensor, candidates: torch.Tensor, *, threshold: torch.Tensor) -> torch.Tensor:
    return rules.threshold_mask(conf, candidates, threshold)


def _factor(conf: torch.Tensor, candidates: torch.Tensor, *, factor: torch.Tensor) -> torch.Tensor:
    return rules.top_k_mask(conf, candidates, rules.factor_count(conf, candidates, factor))


def _hierarchy(
    conf: torch.Tensor, candidates: torch.Tensor, *, threshold: torch.Tensor, low_threshold: torch.Tensor
) -> torch.Tensor:
    return rules.hierarchy_mask(conf, candidates, threshold, low_threshold)


def _credit(
    logits: torch.Tensor,
    candidates: torch.Tensor,
    state: torch.Tensor,
    *,
    credit_alpha: torch.Tensor,
    credit_gamma: torch.Tensor,
    credit_beta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    state = rules.credit_update(state, logits.softmax(-1), candidates, credit_beta, credit_gamma)
    return rules.credit_logits(logits, state, credit_alpha), state


RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule(
            "schedule",
            "LLaDA's linear schedule: exactly steps / num_blocks steps per block, the most confident first",
            fixed_steps=True,
        ),
        Rule("threshold", "every position whose confidence reaches threshold", _threshold, ("threshold",)),
        Rule(
            "factor",
            "Fast-dLLM's factor rule: the largest n with c(n) >= 1 - factor / (n + 1)",
            _factor,
            ("factor",),
        ),
        Rule(
            "hierarchy",
            "dInfer: >= threshold, plus the best position of each masked run reaching low_threshold",
            _hierarchy,
            ("threshold", "low_threshold"),
        ),
        Rule(
            "credit",
            "dInfer credit decoding: logits + alpha * log(1 + credit), credit accumulated per block; "
            "commits like threshold",
            _threshold,
            ("threshold",),
            stateful=True,
            edit_logits=_credit,
            state_params=("credit_alpha", "credit_gamma", "credit_beta"),
        ),
        # Dream's diffusion_generate (decoding/dream.py): these rules choose the tokens too.
        Rule(
            "timestep",
            "Dream: int(masked * (1 - s/t)) positions by confidence (all at the last step), "
            "timesteps linspace(1, eps, steps + 1); Dream's token choice",
            params=("alg_temp", "eps"),
            fixed_steps=True,
        ),
        Rule(
            "origin",
            "Dream: each masked position commits with probability 1 - s/t (1 at the last step); "
            "Dream's token choice",
            params=("eps",),
            fixed_steps=True,
        ),
    )
}


@dataclass(frozen=True)
class Remasking:
    """A confidence measure the rules rank positions by (the ``remasking`` parameter).

    ``measure`` indexes decoding/confidence.py's MEASURES; a ``drawn`` measure is a uniform draw
    from the request's own generator instead (LLaDA's random remasking), which only the
    ``fixed_steps`` schedule can use.
    """

    name: str
    description: str
    measure: int | None  # None: drawn
    drawn: bool = False


REMASKING: dict[str, Remasking] = {
    m.name: m
    for m in (
        Remasking("low_confidence", "the chosen token's probability", 0),
        Remasking("random", "a uniform draw (the fixed schedule only)", None, drawn=True),
        Remasking("margin", "top-1 minus top-2 probability", 1),
        Remasking("entropy", "negative entropy of the position's distribution", 2),
    )
}
