"""Named decoding presets (cache policy + commit rule + defaults) and per-request resolution.

A request names a preset (or an alias) and may override any parameter. ``resolve_params`` merges
the preset's defaults with the overrides that are set (a ``None`` never replaces a default),
validates every value against the model, and returns a frozen ``DecodeParams``. Invalid input
raises ``ParamError`` naming the offending field, which the server turns into a 400.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from dllm_serve.models import registry

CACHES = ("none", "prefix", "dual", "vicinity", "committed")
RULES = ("schedule", "threshold", "factor", "hierarchy", "credit", "timestep", "origin")
# Dream's diffusion_generate rules (decoding/dream.py): they choose tokens Dream's way too.
DREAM_RULES = ("timestep", "origin")
REMASKING = ("low_confidence", "random", "margin", "entropy")


class ParamError(ValueError):
    """A request parameter that cannot be served; ``param`` names the request field."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class DecodeParams:
    """Everything one sequence's decoding needs; every field has a meaning for every preset."""

    algorithm: str
    cache: str
    rule: str
    gen_length: int
    block_length: int
    steps: int
    temperature: float = 0.0
    top_p: float = 1.0
    remasking: str = "low_confidence"
    threshold: float = 0.9
    factor: float = 1.0
    low_threshold: float = 0.4
    credit_alpha: float = 0.7
    credit_gamma: float = 0.2
    credit_beta: float = 0.8
    cfg_scale: float = 0.0
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    prefix_look: int = 16
    after_look: int = 16
    warmup_steps: int = 4
    early_stop: bool = True
    shift_logits: bool = False
    top_k: int = 0  # Dream's rules: keep the k most probable tokens (0: off)
    alg_temp: float = 0.0  # Dream's rules: > 0 draws the committed positions from softmax(conf / alg_temp)
    eps: float = 1e-3  # Dream's rules: the last timestep of linspace(1, eps, steps + 1)
    seed: int | None = None
    max_steps_per_block: int | None = None

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
        return self.steps_per_block if self.rule == "schedule" else self.max_steps_per_block

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    name: str
    engine: str
    attention: str  # the attention the model must have: "full" or "block_causal" (models/family.py)
    cache: str
    rule: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    defaults: tuple[tuple[str, Any], ...] = ()
    # Threshold-style rules take at most steps / num_blocks forwards per block unless the request
    # sets max_steps_per_block (the nemotron preset's documented bound); otherwise they are unbounded.
    steps_bound_rules: bool = False
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
                () if alg == "origin" else (("remasking", measure),),
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
    )
}
ALIASES: dict[str, str] = {a: p.name for p in PRESETS.values() for a in (p.name, *p.aliases)}
ENGINE_DEFAULT_PRESET = {
    "fast-dllm": "dual_cache",
    "dinfer": "dinfer_blockwise",
    "nemotron": "nemotron",
    "dream": "dream_entropy",
}
DEFAULT_BLOCK_LENGTH = 32

# Request fields that override DecodeParams fields of the same name.
OVERRIDABLE = tuple(
    f.name for f in fields(DecodeParams) if f.name not in {"algorithm", "cache", "gen_length"}
)


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
        values["low_threshold"] = min(DecodeParams.low_threshold, threshold)
    default_block = max_new_tokens if preset.whole_canvas else DEFAULT_BLOCK_LENGTH
    block_length = values.pop("block_length", default_block)
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
    )
    params = replace(params, **values)
    if params.rule != "schedule" and params.max_steps_per_block is None and preset.steps_bound_rules:
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


def _validate(p: DecodeParams) -> None:
    if p.rule not in RULES:
        raise ParamError("rule", f"rule must be one of {', '.join(RULES)}, got {p.rule!r}")
    if p.remasking not in REMASKING:
        raise ParamError("remasking", f"remasking must be one of {', '.join(REMASKING)}, got {p.remasking!r}")
    if p.remasking == "random" and p.rule != "schedule":
        raise ParamError(
            "remasking", "remasking 'random' only applies to the fixed schedule (rule 'schedule')"
        )
    _check_range("temperature", p.temperature, 0.0, 100.0)
    _check_range("top_p", p.top_p, 0.0, 1.0, low_open=True)
    _check_range("threshold", p.threshold, 0.0, 1.0)
    _check_range("factor", p.factor, 0.0, 1000.0, low_open=True)
    _check_range("low_threshold", p.low_threshold, 0.0, 1.0)
    if p.low_threshold > p.threshold:
        raise ParamError(
            "low_threshold", f"low_threshold ({p.low_threshold}) must not exceed threshold ({p.threshold})"
        )
    _check_range("credit_alpha", p.credit_alpha, 0.0, 100.0)
    _check_range("credit_gamma", p.credit_gamma, 0.0, 100.0)
    _check_range("credit_beta", p.credit_beta, 0.0, 1.0)
    _check_range("cfg_scale", p.cfg_scale, 0.0, 100.0)
    if p.cfg_scale > 0 and p.cache != "none":
        raise ParamError("cfg_scale", "cfg_scale needs the full-canvas 'llada' algorithm (no KV cache)")
    for name in ("prefix_look", "after_look", "warmup_steps"):
        _check_int(name, getattr(p, name), 0)
    for name in ("logits_eos_inf", "confidence_eos_eot_inf", "early_stop", "shift_logits"):
        if not isinstance(getattr(p, name), bool):
            raise ParamError(name, f"{name} must be a boolean")
    if p.max_steps_per_block is not None:
        _check_int("max_steps_per_block", p.max_steps_per_block, 1)
        if p.rule == "schedule" or p.rule in DREAM_RULES:
            raise ParamError(
                "max_steps_per_block",
                f"max_steps_per_block bounds the threshold-style rules; the {p.rule} rule takes exactly "
                "steps / num_blocks steps per block (set steps instead)",
            )
    _check_int("top_k", p.top_k, 0)
    _check_range("alg_temp", p.alg_temp, 0.0, 100.0)
    _check_range("eps", p.eps, 0.0, 1.0, low_open=True)
    if p.eps >= 1.0:
        raise ParamError("eps", f"eps must be below 1 (the last timestep), got {p.eps!r}")
    if p.rule in DREAM_RULES and p.remasking not in ("low_confidence", "margin", "entropy"):
        raise ParamError("remasking", f"rule {p.rule!r} ranks by low_confidence, margin or entropy")
    if p.seed is not None and (isinstance(p.seed, bool) or not isinstance(p.seed, int) or p.seed < 0):
        raise ParamError("seed", f"seed must be a non-negative integer, got {p.seed!r}")


def describe_presets(family: str | None = None) -> list[dict[str, Any]]:
    """Presets, aliases and defaults, as served by GET /v1/algorithms."""
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
        defaults = {
            k: v
            for k, v in replace(base, **dict(p.defaults)).to_dict().items()
            if k not in {"algorithm", "gen_length", "steps", "seed"}
        }
        if p.whole_canvas:
            defaults["block_length"] = None  # one block: the whole max_tokens canvas
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
                "defaults": defaults,
            }
        )
    return out
