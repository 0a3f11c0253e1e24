"""Named decoding presets (cache policy + commit rule + defaults) and per-request resolution.

A request names a preset (or an alias) and may override any parameter. ``resolve_params`` merges
the preset's defaults with the overrides that are set (a ``None`` never replaces a default),
validates every value against the model, and returns a frozen ``DecodeParams``. Invalid input
raises ``ParamError`` naming the offending field, which the server turns into a 400.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, cast

from dllm_serve.decoding.dream import DREAM_RULES
from dllm_serve.decoding.registry import REMASKING, RULES, Knob, knob, knob_metadata
from dllm_serve.models import registry

# Policies whose committed context is causal (engine/causal_modes.py: Nemotron-Labs' modes).
CAUSAL_CACHES = ("causal", "ar", "speculative")


class ParamError(ValueError):
    """A request parameter that cannot be served; ``param`` names the request field."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class DecodeParams:
    """Everything one sequence's decoding needs; every field has a meaning for every preset.

    The fields declared with ``knob`` are the decoding parameters a request (and the ``generate`` /
    ``eval`` flags) may set; their metadata (decoding/registry.py ``Knob``) drives validation, the
    request schema, the CLI flags and /v1/algorithms. The others are fixed by the preset.
    """

    algorithm: str
    cache: str
    rule: str = field(metadata=knob_metadata(help="commit rule (decoding/registry.py RULES)", choices=RULES))
    gen_length: int
    block_length: int = field(
        metadata=knob_metadata(help="tokens per block; the canvas is rounded up to whole blocks", low=1)
    )
    steps: int = field(
        metadata=knob_metadata(
            help="forwards of the schedule rule (a multiple of the number of blocks)", low=1
        )
    )
    temperature: float = knob(0.0, help="Gumbel-max sampling temperature (0: argmax)", low=0.0, high=100.0)
    top_p: float = knob(1.0, help="nucleus filter before sampling (1: off)", low=0.0, high=1.0, low_open=True)
    remasking: str = knob(
        "low_confidence", help="confidence measure ranking positions (REMASKING)", choices=REMASKING
    )
    threshold: float = knob(0.9, help="commit positions whose confidence reaches it", low=0.0, high=1.0)
    factor: float = knob(1.0, help="Fast-dLLM's factor rule's f", low=0.0, high=1000.0, low_open=True)
    low_threshold: float = knob(
        0.4, help="hierarchy rule: a masked run's best position commits at this confidence", low=0.0, high=1.0
    )
    credit_alpha: float = knob(0.7, help="credit rule: weight of log(1 + credit)", low=0.0, high=100.0)
    credit_gamma: float = knob(
        0.2, help="credit rule: exponent of the top-1 probability", low=0.0, high=100.0
    )
    credit_beta: float = knob(0.8, help="credit rule: decay per step", low=0.0, high=1.0)
    cfg_scale: float = knob(
        0.0, help="classifier-free guidance scale (the full-canvas 'llada' algorithm)", low=0.0, high=100.0
    )
    logits_eos_inf: bool = knob(False, help="never choose EOS")
    confidence_eos_eot_inf: bool = knob(False, help="EOS/EOT confidence 0, as ML-GSAI's generate does")
    prefix_look: int = knob(16, help="vicinity cache: tokens before the block refreshed", low=0)
    after_look: int = knob(16, help="vicinity cache: tokens after the block refreshed", low=0)
    warmup_steps: int = knob(4, help="vicinity cache: full forwards at each block start", low=0)
    early_stop: bool = knob(True, help="finish at a stop token without decoding the rest of the canvas")
    shift_logits: bool = knob(False, help="position i is predicted by the logits at i - 1")
    top_k: int = knob(0, help="Dream's rules: keep the k most probable tokens (0: off)", low=0)
    alg_temp: float = knob(
        0.0, help="Dream's rules: > 0 draws the committed positions from softmax(confidence / alg_temp)",
        low=0.0, high=100.0,
    )  # fmt: skip
    eps: float = knob(
        1e-3, help="Dream's rules: the last timestep of linspace(1, eps, steps + 1), below 1",
        low=0.0, high=1.0, low_open=True,
    )  # fmt: skip
    seed: int | None = knob(None, help="the request's random stream (None: a fresh one)", low=0)
    max_steps_per_block: int | None = knob(
        None, help="bound on a threshold-style rule's forwards per block (None: unbounded)", low=1
    )
    # Fixed by the preset (Preset.canvas_noise): draw each step's noise over the whole canvas, as
    # LLaDA's reference generate() does, so seeded outputs match it; otherwise over the block.
    canvas_noise: bool = False
    # LLaDA2.1's token-to-token editing: None is off; otherwise committed tokens of the active
    # block are re-decoded when the model's probability of another token exceeds this, for at
    # most max_post_steps forwards after the block's last mask is filled.
    editing_threshold: float | None = knob(
        None,
        help="LLaDA2.1 token editing: re-decode a committed token whose replacement is more probable "
        "than this (None: off; the aligned presets only)",
        low=0.0,
        high=1.0,
    )
    max_post_steps: int = knob(16, help="token editing: forwards of a filled block at most", low=0)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def step_budget(self) -> int | None:
        """Forwards a block may take at most; None: until the rule has committed every position.

        The schedule rule takes exactly ``steps / num_blocks``. The threshold-style rules ignore
        ``steps``, as Fast-dLLM's and dInfer's decoders do, unless ``max_steps_per_block`` bounds them.
        """
        return self.steps_per_block if RULES[self.rule].fixed_steps else self.max_steps_per_block

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    name: str
    engine: str
    attention: str  # the attention the model must have: ATTENTION_KINDS of models/family.py
    cache: str
    rule: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    # Threshold-style rules take at most steps / num_blocks forwards per block unless the request
    # sets max_steps_per_block (the nemotron preset's documented bound); otherwise they are unbounded.
    steps_bound_rules: bool = False
    # Draws each step's noise over the whole canvas (DecodeParams.canvas_noise): the reference sampler.
    canvas_noise: bool = False
    # Knob values this preset sets unlike DecodeParams' defaults (request and checkpoint values win).
    defaults: tuple[tuple[str, Any], ...] = ()
    # One block over the whole canvas unless the request sets block_length (Dream's diffusion_generate).
    whole_canvas: bool = False


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "llada",
            "fast-dllm",
            "full",
            "none",
            "schedule",
            ("basic", "no_cache"),
            "LLaDA's reference sampler: full canvas every step, linear schedule",
            canvas_noise=True,
        ),
        Preset(
            "prefix_cache",
            "fast-dllm",
            "full",
            "prefix",
            "threshold",
            ("prefix",),
            "Fast-dLLM prefix KV cache, refreshed per block, threshold decoding",
        ),
        Preset(
            "dual_cache",
            "fast-dllm",
            "full",
            "dual",
            "threshold",
            ("dual",),
            "Fast-dLLM dual (prefix + suffix) KV cache, threshold decoding",
        ),
        Preset(
            "dinfer_blockwise",
            "dinfer",
            "full",
            "vicinity",
            "threshold",
            ("dinfer", "blockwise"),
            "dInfer: dual cache with vicinity refresh, threshold decoding, early stop at EOS",
        ),
        Preset(
            "dinfer_hierarchy",
            "dinfer",
            "full",
            "vicinity",
            "hierarchy",
            ("dinfer_hierarchical",),
            "dInfer hierarchical decoding (threshold + low_threshold per masked segment)",
        ),
        Preset(
            "dinfer_credit",
            "dinfer",
            "full",
            "vicinity",
            "credit",
            (),
            "dInfer credit decoding (alpha, gamma, beta) + threshold",
        ),
        *(
            Preset(
                f"dream_{alg}",
                "dream",
                "full",
                "none",
                "origin" if alg == "origin" else "timestep",
                (alg,),
                f"Dream's diffusion_generate, alg={alg!r}: whole canvas every step, {what}",
                defaults=(("remasking", measure),) if measure else (),
                canvas_noise=True,
                whole_canvas=True,
            )
            for alg, measure, what in (
                ("origin", None, "each masked position commits with probability 1 - s/t"),
                ("maskgit_plus", "low_confidence", "the int(masked * (1 - s/t)) most probable commit"),
                ("topk_margin", "margin", "the int(masked * (1 - s/t)) largest top-1 - top-2 margins commit"),
                ("entropy", "entropy", "the int(masked * (1 - s/t)) lowest-entropy positions commit"),
            )
        ),
        Preset(
            "nemotron",
            "nemotron",
            "block_causal",
            "committed",
            "threshold",
            (),
            "Nemotron block diffusion: committed-context KV cache, threshold decoding",
            steps_bound_rules=True,
        ),
        Preset(
            "nemotron_labs",
            "nemotron-labs",
            "causal",
            "causal",
            "threshold",
            ("dlm", "labs_diffusion"),
            "Nemotron-Labs diffusion: causal committed context, each block opened by the causal "
            "next-token prediction, threshold decoding",
            steps_bound_rules=True,
        ),
        Preset(
            "nemotron_labs_ar",
            "nemotron-labs",
            "causal",
            "ar",
            "threshold",
            ("ar", "autoregressive"),
            "Nemotron-Labs autoregressive decoding: causal attention, one token per forward, KV cache",
        ),
        Preset(
            "nemotron_labs_spec",
            "nemotron-labs",
            "causal",
            "speculative",
            "threshold",
            ("linear_spec", "self_speculative"),
            "Nemotron-Labs self-speculation: draft a block by diffusion, verify it causally, accept "
            "the agreeing prefix plus one token",
            defaults=(("threshold", 0.0),),
        ),
        Preset(
            "sdar",
            "sdar",
            "aligned_block_causal",
            "aligned",
            "threshold",
            ("low_confidence_dynamic", "sdar_dynamic"),
            "SDAR low_confidence_dynamic: committed-context KV cache with blocks at absolute positions, "
            "threshold with SDAR's per-step minimum",
            steps_bound_rules=True,
        ),
        Preset(
            "sdar_static",
            "sdar",
            "aligned_block_causal",
            "aligned",
            "schedule",
            ("low_confidence_static",),
            "SDAR low_confidence_static: the same cache, a fixed number of most confident tokens per step",
        ),
        Preset(
            "llada2",
            "llada2",
            "block_aligned",
            "aligned",
            "threshold",
            ("llada2.0",),
            "LLaDA2.0's generate: blocks of 32 from position 0, committed-context KV cache, threshold 0.95",
            defaults=(("threshold", 0.95),),
            steps_bound_rules=True,
        ),
        Preset(
            "llada2_quality",
            "llada2",
            "block_aligned",
            "aligned",
            "threshold",
            ("llada2.1", "llada2.1_quality"),
            "LLaDA2.1 quality mode: threshold 0.7, token editing above 0.5, up to 16 post steps",
            defaults=(("threshold", 0.7), ("editing_threshold", 0.5), ("max_post_steps", 16)),
        ),
        Preset(
            "llada2_speed",
            "llada2",
            "block_aligned",
            "aligned",
            "threshold",
            ("llada2.1_speed",),
            "LLaDA2.1 speed mode: threshold 0.5, no token editing",
            defaults=(("threshold", 0.5), ("max_post_steps", 16)),
        ),
    )
}
ALIASES: dict[str, str] = {a: p.name for p in PRESETS.values() for a in (p.name, *p.aliases)}
ENGINE_DEFAULT_PRESET = {
    "fast-dllm": "dual_cache",
    "dinfer": "dinfer_blockwise",
    "nemotron": "nemotron",
    "nemotron-labs": "nemotron_labs",
    "sdar": "sdar",
    "dream": "dream_entropy",
    "llada2": "llada2",
}
DEFAULT_BLOCK_LENGTH = 32

# Request fields that override DecodeParams fields of the same name: the knobs.
KNOBS: dict[str, Knob] = {f.name: f.metadata["knob"] for f in fields(DecodeParams) if "knob" in f.metadata}
OVERRIDABLE = tuple(KNOBS)


def presets_for(family: str) -> list[Preset]:
    """The presets a registered model family can run: those declaring its attention kind."""
    attention = registry.get(family).attention
    return [p for p in PRESETS.values() if p.attention == attention]


def canonical_name(name: str, family: str) -> str:
    """The preset a name or alias refers to; a ParamError lists the valid names otherwise."""
    valid = presets_for(family)
    listing = ", ".join(f"{p.name} ({', '.join(p.aliases)})" if p.aliases else p.name for p in valid)
    if not isinstance(name, str):
        raise ParamError("algorithm", f"algorithm must be a string; valid for this model: {listing}")
    key = name.strip().lower()
    if key not in ALIASES:
        raise ParamError("algorithm", f"unknown algorithm {name!r}; valid for this model: {listing}")
    preset = PRESETS[ALIASES[key]]
    if preset not in valid:
        raise ParamError(
            "algorithm",
            f"algorithm {preset.name!r} cannot run on a {family} model; valid for this model: {listing}",
        )
    return preset.name


def default_preset(engine: str, family: str) -> str:
    """The server's default preset for ``--engine`` (``auto``: the family's own, from its spec)."""
    if engine == "auto":
        return registry.get(family).default_preset
    if engine not in ENGINE_DEFAULT_PRESET:
        raise ValueError(f"unknown engine {engine!r}; choose auto, {', '.join(ENGINE_DEFAULT_PRESET)}")
    name = ENGINE_DEFAULT_PRESET[engine]
    if PRESETS[name] not in presets_for(family):
        raise ValueError(f"engine {engine!r} cannot serve a {family} model")
    return name


def resolve_params(
    algorithm: str,
    family: str,
    max_new_tokens: int,
    overrides: dict[str, Any] | None = None,
    *,
    model_defaults: dict[str, Any] | None = None,
) -> DecodeParams:
    """Merge preset defaults, model defaults and request overrides, then validate.

    ``max_new_tokens`` sets the canvas: rounded up to whole blocks (never padded with extra work
    beyond that). ``overrides`` values that are None are ignored.
    """
    name = canonical_name(algorithm, family)
    preset = PRESETS[name]
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(OVERRIDABLE))
    if unknown:
        raise ParamError(unknown[0], f"unknown decoding parameter {unknown[0]!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ParamError("max_tokens", f"max_tokens must be a positive integer, got {max_new_tokens!r}")

    explicit_rule = given.pop("rule", None)
    rule = explicit_rule or preset.rule
    if explicit_rule is None:
        # Naming a rule's own knob selects that rule on presets whose default rule lacks it.
        if "factor" in given and preset.rule in {"schedule", "threshold"}:
            rule = "factor"
        elif "threshold" in given and preset.rule == "schedule":
            rule = "threshold"
    values: dict[str, Any] = dict(preset.defaults)
    values.update({k: v for k, v in (model_defaults or {}).items() if v is not None})
    values.update(given)
    threshold = values.get("threshold")
    if "low_threshold" not in values and type(threshold) in (int, float):
        # A threshold below the default low_threshold must not fail on a field nobody set. Capping
        # it at the threshold commits exactly the same positions: with low_threshold >= threshold
        # the hierarchy rule's per-run pick only finds positions the threshold already commits.
        values["low_threshold"] = min(DecodeParams.low_threshold, cast(float, threshold))
    block_length = values.pop("block_length", max_new_tokens if preset.whole_canvas else DEFAULT_BLOCK_LENGTH)
    _check_int("block_length", block_length, 1)
    gen_length = math.ceil(max_new_tokens / block_length) * block_length
    steps = values.pop("steps", None)
    steps = gen_length if steps is None else steps
    _check_int("steps", steps, 1)
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ParamError(
            "steps",
            f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks} = "
            f"{gen_length} tokens / block_length {block_length})",
        )
    params = DecodeParams(
        algorithm=name,
        cache=preset.cache,
        rule=rule,
        gen_length=gen_length,
        block_length=block_length,
        steps=steps,
        canvas_noise=preset.canvas_noise,
    )
    params = replace(params, **values)
    bounded = params.rule in RULES and not RULES[params.rule].fixed_steps
    if bounded and params.max_steps_per_block is None and preset.steps_bound_rules:
        params = replace(params, max_steps_per_block=params.steps_per_block)
    _validate(params)
    return params


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ParamError(name, f"{name} must be an integer >= {low}, got {value!r}")


def _check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ParamError(name, f"{name} must be a number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ParamError(name, f"{name} must be in {bracket}{low}, {high}], got {value!r}")


def _check_knob(name: str, kind: Any, spec: Knob, value: Any) -> None:
    """One knob's value against its annotation and its range or choices."""
    if value is None and type(None) in typing.get_args(kind):
        return
    kind = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # X | None -> X
    if spec.choices:
        if not isinstance(value, str) or value not in spec.choices:
            raise ParamError(name, f"{name} must be one of {', '.join(spec.choices)}, got {value!r}")
    elif kind is bool:
        if not isinstance(value, bool):
            raise ParamError(name, f"{name} must be a boolean")
    elif kind is float:
        low = -math.inf if spec.low is None else spec.low
        high = math.inf if spec.high is None else spec.high
        _check_range(name, value, low, high, low_open=spec.low_open)
    else:  # int
        _check_int(name, value, int(spec.low or 0))


def _validate(p: DecodeParams) -> None:
    hints = typing.get_type_hints(DecodeParams)
    for name, spec in KNOBS.items():
        _check_knob(name, hints[name], spec, getattr(p, name))
    rule = RULES[p.rule]
    if REMASKING[p.remasking].drawn and p.rule in DREAM_RULES:
        raise ParamError(
            "remasking",
            f"remasking {p.remasking!r} does not apply to rule {p.rule!r}: it ranks by low_confidence, "
            "margin or entropy",
        )
    if p.eps >= 1.0:
        raise ParamError("eps", f"eps must be below 1 (the last timestep), got {p.eps!r}")
    if REMASKING[p.remasking].drawn and not rule.fixed_steps:
        raise ParamError(
            "remasking", f"remasking {p.remasking!r} only applies to the fixed schedule (rule 'schedule')"
        )
    if p.low_threshold > p.threshold:
        raise ParamError(
            "low_threshold", f"low_threshold ({p.low_threshold}) must not exceed threshold ({p.threshold})"
        )
    if p.shift_logits and p.cache in CAUSAL_CACHES:
        raise ParamError("shift_logits", f"shift_logits does not apply to the {p.algorithm!r} algorithm")
    if p.cfg_scale > 0 and p.cache != "none":
        raise ParamError("cfg_scale", "cfg_scale needs the full-canvas 'llada' algorithm (no KV cache)")
    if p.editing_threshold is not None and p.cache != "aligned":
        raise ParamError(
            "editing_threshold", "token editing needs a LLaDA2 preset (llada2, llada2_quality, llada2_speed)"
        )
    if p.max_steps_per_block is not None and rule.fixed_steps:
        raise ParamError(
            "max_steps_per_block",
            f"max_steps_per_block bounds the threshold-style rules; the {p.rule} rule takes exactly "
            "steps / num_blocks steps per block (set steps instead)",
        )


def describe_parameters() -> list[dict[str, Any]]:
    """Every decoding parameter a request may set: type, range or choices, and what it does."""
    hints = typing.get_type_hints(DecodeParams)
    out = []
    for name, spec in KNOBS.items():
        entry: dict[str, Any] = {"name": name, "type": _type_name(hints[name]), "description": spec.help}
        if spec.choices:
            entry["choices"] = list(spec.choices)
        if spec.low is not None:
            entry["min"] = spec.low
        if spec.high is not None:
            entry["max"] = spec.high
        out.append(entry)
    return out


def _type_name(kind: Any) -> str:
    names = [t.__name__ for t in typing.get_args(kind) or (kind,) if t is not type(None)]
    return names[0] + (" | null" if type(None) in typing.get_args(kind) else "")


def describe_rules() -> list[dict[str, Any]]:
    """The rules as listed by `dllm-serve models` and GET /v1/algorithms."""
    return [
        {
            "name": r.name,
            "description": r.description,
            "parameters": list(r.parameters),
            "keeps_state": r.stateful,
            "fixed_steps": r.fixed_steps,
        }
        for r in RULES.values()
    ]


def describe_presets(
    family: str | None = None, model_defaults: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Presets, aliases and defaults, as served by GET /v1/algorithms. ``model_defaults`` (the loaded
    checkpoint's, e.g. SDAR's block_size 4) overlay the presets' as they do when a request is resolved,
    so the listing shows what a request that sets nothing gets."""
    out = []
    for p in PRESETS.values() if family is None else presets_for(family):
        families = [spec.name for spec in registry.families_with_attention(p.attention)]
        base = DecodeParams(
            algorithm=p.name,
            cache=p.cache,
            rule=p.rule,
            gen_length=0,
            block_length=DEFAULT_BLOCK_LENGTH,
            steps=0,
        )
        defaults: dict[str, Any] = {
            k: v
            for k, v in replace(base, **dict(p.defaults)).to_dict().items()
            if k not in {"algorithm", "gen_length", "steps", "seed", "canvas_noise"}
        }
        if p.whole_canvas:
            defaults["block_length"] = None  # one block: the whole max_tokens canvas
        defaults.update({k: v for k, v in (model_defaults or {}).items() if v is not None and k in defaults})
        out.append(
            {
                "name": p.name,
                "aliases": list(p.aliases),
                "engine": p.engine,
                "attention": p.attention,
                # The loaded model's family, or (no model) the first registered family that runs it.
                "model_family": family or (families[0] if families else None),
                "model_families": families,
                "description": p.description,
                "noise": "canvas" if p.canvas_noise else "block",
                "defaults": defaults,
            }
        )
    return out
