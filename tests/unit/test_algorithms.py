"""Preset resolution (engine/algorithms.py): names, defaults, canvas, rule selection, validation."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from dllm_serve.engine.algorithms import (
    OVERRIDABLE,
    DecodeParams,
    ParamError,
    canonical_name,
    default_preset,
    describe_presets,
    resolve_params,
)

LLADA_NAMES = {
    "llada": ("none", "schedule"),
    "prefix_cache": ("prefix", "threshold"),
    "dual_cache": ("dual", "threshold"),
    "dinfer_blockwise": ("vicinity", "threshold"),
    "dinfer_hierarchy": ("vicinity", "hierarchy"),
    "dinfer_credit": ("vicinity", "credit"),
}
# Dream's diffusion_generate (full attention: listed for every full-attention family).
DREAM_NAMES = {
    "dream_origin": ("none", "origin"),
    "dream_maskgit_plus": ("none", "timestep"),
    "dream_topk_margin": ("none", "timestep"),
    "dream_entropy": ("none", "timestep"),
}
FULL_NAMES = {**LLADA_NAMES, **DREAM_NAMES}
LLADA_ALIASES = {
    "origin": "dream_origin",
    "maskgit_plus": "dream_maskgit_plus",
    "topk_margin": "dream_topk_margin",
    "entropy": "dream_entropy",
    "basic": "llada",
    "no_cache": "llada",
    "prefix": "prefix_cache",
    "dual": "dual_cache",
    "dinfer": "dinfer_blockwise",
    "blockwise": "dinfer_blockwise",
    "dinfer_hierarchical": "dinfer_hierarchy",
}


def resolve(algorithm: str = "dual_cache", max_new_tokens: int = 64, **overrides: Any) -> DecodeParams:
    family = "nemotron" if algorithm == "nemotron" else "llada"
    return resolve_params(algorithm, family, max_new_tokens, overrides)


def param_error(algorithm: str = "dual_cache", max_new_tokens: int = 64, **overrides: Any) -> ParamError:
    with pytest.raises(ParamError) as info:
        resolve(algorithm, max_new_tokens, **overrides)
    return info.value


# -- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*FULL_NAMES, *LLADA_ALIASES])
def test_llada_names_and_aliases_resolve(name: str) -> None:
    canonical = LLADA_ALIASES.get(name, name)
    params = resolve(name)
    assert params.algorithm == canonical
    assert (params.cache, params.rule) == FULL_NAMES[canonical]
    assert canonical_name(name, "llada") == canonical


def test_names_ignore_case_and_spaces_and_nemotron_resolves() -> None:
    assert canonical_name("  Dual ", "llada") == "dual_cache"
    assert canonical_name("DINFER_Hierarchical", "llada") == "dinfer_hierarchy"
    params = resolve("nemotron")
    assert (params.algorithm, params.cache, params.rule) == ("nemotron", "committed", "threshold")


def test_unknown_name_lists_every_valid_name() -> None:
    err = param_error("fastest")
    assert err.param == "algorithm"
    message = str(err)
    assert "'fastest'" in message
    for name in [*LLADA_NAMES, *LLADA_ALIASES]:
        assert name in message
    assert "nemotron" not in message


def test_presets_of_the_other_family_are_rejected() -> None:
    with pytest.raises(ParamError) as info:
        resolve_params("nemotron", "llada", 64)
    assert info.value.param == "algorithm"
    assert "cannot run on a llada model" in str(info.value)
    assert "dinfer_blockwise" in str(info.value)
    for name in ("llada", "dual", "dinfer_blockwise", "dinfer_credit"):
        with pytest.raises(ParamError) as info:
            resolve_params(name, "nemotron", 64)
        assert info.value.param == "algorithm"
        assert "valid for this model: nemotron" in str(info.value)


def test_non_string_name_is_a_param_error() -> None:
    with pytest.raises(ParamError) as info:
        resolve_params(None, "llada", 64)  # type: ignore[arg-type]
    assert info.value.param == "algorithm"


# -- defaults, canvas, steps ------------------------------------------------------------------------


def test_none_never_replaces_a_default() -> None:
    plain = resolve("dinfer_credit", 100)
    assert resolve_params("dinfer_credit", "llada", 100, dict.fromkeys(OVERRIDABLE)) == plain
    assert plain.threshold == 0.9 and plain.block_length == 32 and plain.temperature == 0.0
    assert plain.credit_alpha == 0.7 and plain.credit_gamma == 0.2 and plain.credit_beta == 0.8
    # Model defaults sit between preset defaults and the request; None there is ignored too.
    with_model = resolve_params(
        "dual", "llada", 64, {"threshold": 0.8}, model_defaults={"threshold": 0.7, "top_p": 0.9, "seed": None}
    )
    assert (with_model.threshold, with_model.top_p, with_model.seed) == (0.8, 0.9, None)
    # Before the fix a None model default replaced the preset's value (and then failed validation).
    from_model = resolve_params("dual", "llada", 64, model_defaults={"threshold": None, "block_length": 16})
    assert (from_model.threshold, from_model.block_length, from_model.gen_length) == (0.9, 16, 64)


@pytest.mark.parametrize(
    ("max_new_tokens", "block_length", "gen_length"),
    [(40, 32, 64), (64, 32, 64), (1, 32, 32), (33, 32, 64), (40, 8, 40), (41, 8, 48), (5, 1, 5)],
)
def test_canvas_rounds_up_to_whole_blocks(max_new_tokens: int, block_length: int, gen_length: int) -> None:
    params = resolve("llada", max_new_tokens, block_length=block_length)
    assert params.gen_length == gen_length
    assert params.num_blocks == gen_length // block_length
    # Steps default to one per canvas token: LLaDA's one-token-per-step schedule.
    assert params.steps == gen_length
    assert params.steps_per_block == block_length


def test_block_length_defaults_to_32() -> None:
    params = resolve("llada", 40)
    assert (params.block_length, params.gen_length, params.steps, params.steps_per_block) == (32, 64, 64, 32)


def test_steps_must_divide_into_blocks() -> None:
    err = param_error("llada", 40, steps=33)  # 40 tokens -> 64 = 2 blocks of 32
    assert err.param == "steps"
    assert "2" in str(err) and "33" in str(err)
    params = resolve("llada", 40, steps=2)
    assert (params.steps, params.steps_per_block) == (2, 1)
    assert resolve("llada", 40, steps=128).steps_per_block == 64
    assert param_error("llada", 40, steps=0).param == "steps"
    assert param_error("llada", 40, steps=16.0).param == "steps"


def test_step_budget_schedule_exact_threshold_rules_unbounded_unless_capped() -> None:
    # The schedule rule takes exactly steps / num_blocks; Fast-dLLM's and dInfer's threshold-style
    # decoders never read steps, so neither do their presets' threshold-style rules.
    assert resolve("llada", 64, steps=16).step_budget == 8
    for name in ("prefix_cache", "dual_cache", "dinfer_blockwise", "dinfer_hierarchy", "dinfer_credit"):
        assert resolve(name, 64, steps=16).step_budget is None, name
    assert resolve("llada", 64, steps=16, threshold=0.9).step_budget is None
    assert resolve("llada", 64, steps=16, factor=1.0).step_budget is None
    # The cap for bounded latency is its own parameter, per block.
    capped = resolve("dual_cache", 64, steps=16, max_steps_per_block=3)
    assert (capped.step_budget, capped.steps) == (3, 16)
    assert resolve("dinfer_hierarchy", 64, max_steps_per_block=1).step_budget == 1
    # The nemotron preset keeps its documented bound: steps / num_blocks unless capped explicitly.
    assert resolve("nemotron", 64, steps=16).step_budget == 8
    assert resolve("nemotron", 64, steps=16, max_steps_per_block=5).step_budget == 5
    assert resolve("nemotron", 64, steps=16, rule="schedule").max_steps_per_block is None


def test_max_steps_per_block_cli_flag() -> None:
    from dllm_serve.cli import build_parser
    from dllm_serve.commands import decoding_overrides

    args = build_parser().parse_args(["generate", "--max-steps-per-block", "2", "--threshold", "0.8", "hi"])
    assert decoding_overrides(args) == {"max_steps_per_block": 2, "threshold": 0.8}
    assert resolve("llada", 64, **decoding_overrides(args)).step_budget == 2


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "4"])
def test_max_steps_per_block_validation(bad: Any) -> None:
    err = param_error("dual_cache", 64, max_steps_per_block=bad)
    assert err.param == "max_steps_per_block"
    assert "integer >= 1" in str(err)


def test_max_steps_per_block_refused_with_the_schedule_rule() -> None:
    err = param_error("llada", 64, max_steps_per_block=4)
    assert err.param == "max_steps_per_block" and "set steps instead" in str(err)
    assert (
        param_error("dual_cache", 64, rule="schedule", max_steps_per_block=4).param == "max_steps_per_block"
    )


@pytest.mark.parametrize("bad", [0, -32, True, 2.5, "32"])
def test_block_length_must_be_a_positive_integer(bad: Any) -> None:
    # Before the fix 0 silently became 32, True became 1, 2.5 became 2 and "32" became 32.
    assert param_error("llada", 40, block_length=bad).param == "block_length"


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_max_new_tokens_must_be_a_positive_integer(bad: Any) -> None:
    assert param_error("llada", bad).param == "max_tokens"


# -- rule selection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["llada", "prefix_cache", "dual_cache", "dinfer_blockwise", "nemotron"])
def test_factor_selects_the_factor_rule(algorithm: str) -> None:
    params = resolve(algorithm, factor=2.0)
    assert (params.rule, params.factor) == ("factor", 2.0)


def test_factor_does_not_replace_hierarchy_or_credit() -> None:
    assert resolve("dinfer_hierarchy", factor=2.0).rule == "hierarchy"
    assert resolve("dinfer_credit", factor=2.0).rule == "credit"


def test_threshold_on_llada_selects_the_threshold_rule() -> None:
    params = resolve("llada", threshold=0.8)
    assert (params.rule, params.threshold) == ("threshold", 0.8)
    assert resolve("dual", threshold=0.8).rule == "threshold"
    assert resolve("dinfer_hierarchy", threshold=0.8).rule == "hierarchy"


def test_explicit_rule_wins() -> None:
    assert resolve("llada", threshold=0.8, rule="schedule").rule == "schedule"
    assert resolve("dual", factor=2.0, rule="threshold").rule == "threshold"
    assert resolve("dinfer", rule="hierarchy").rule == "hierarchy"
    assert resolve("llada", rule="credit").rule == "credit"
    assert param_error("llada", rule="greedy").param == "rule"


# -- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "overrides", "param"),
    [
        ("dual", {"temperature": -0.1}, "temperature"),
        ("dual", {"temperature": "hot"}, "temperature"),
        ("dual", {"top_p": 0.0}, "top_p"),
        ("dual", {"top_p": 1.01}, "top_p"),
        ("dual", {"threshold": 1.01}, "threshold"),
        ("dual", {"threshold": -0.1}, "threshold"),
        ("dual", {"threshold": float("nan")}, "threshold"),
        ("dinfer_hierarchy", {"threshold": 0.5, "low_threshold": 0.6}, "low_threshold"),
        ("dinfer_hierarchy", {"low_threshold": 0.95}, "low_threshold"),
        ("dinfer_hierarchy", {"low_threshold": -0.1}, "low_threshold"),
        ("dual", {"factor": 0.0}, "factor"),
        ("dinfer_credit", {"credit_beta": 1.1}, "credit_beta"),
        ("dinfer_credit", {"credit_alpha": -1.0}, "credit_alpha"),
        ("dinfer_credit", {"credit_gamma": -0.5}, "credit_gamma"),
        ("dinfer", {"prefix_look": -1}, "prefix_look"),
        ("dinfer", {"after_look": 1.5}, "after_look"),
        ("dinfer", {"warmup_steps": -2}, "warmup_steps"),
        ("dinfer", {"early_stop": "yes"}, "early_stop"),
        ("dinfer", {"early_stop": 1}, "early_stop"),
        ("llada", {"logits_eos_inf": 0}, "logits_eos_inf"),
        ("dual", {"seed": -1}, "seed"),
        ("dual", {"seed": True}, "seed"),
        ("dual", {"seed": 1.5}, "seed"),
        ("dual_cache", {"cfg_scale": 1.0}, "cfg_scale"),
        ("dinfer", {"cfg_scale": 0.5}, "cfg_scale"),
        ("llada", {"cfg_scale": -1.0}, "cfg_scale"),
        ("dinfer", {"remasking": "random"}, "remasking"),
        ("llada", {"remasking": "random", "threshold": 0.9}, "remasking"),
        ("llada", {"remasking": "top_k"}, "remasking"),
        ("dual", {"foo": 1}, "foo"),
        ("dual", {"algorithm": "llada"}, "algorithm"),
        ("dual", {"gen_length": 128}, "gen_length"),
    ],
)
def test_range_checks(algorithm: str, overrides: dict[str, Any], param: str) -> None:
    with pytest.raises(ParamError) as info:
        resolve_params(algorithm, "llada", 64, overrides)
    assert info.value.param == param


def test_values_on_the_boundaries_are_accepted() -> None:
    params = resolve(
        "llada",
        temperature=0.0,
        top_p=1.0,
        cfg_scale=2.0,
        remasking="random",
        seed=0,
        prefix_look=0,
        early_stop=False,
    )
    assert (params.rule, params.remasking, params.cfg_scale, params.seed) == ("schedule", "random", 2.0, 0)
    assert resolve("dinfer_hierarchy", threshold=0.6, low_threshold=0.6).low_threshold == 0.6
    assert resolve("dinfer_credit", credit_beta=1.0).credit_beta == 1.0
    assert resolve("dual", threshold=1.0, top_p=1e-3).threshold == 1.0
    assert resolve("dual", remasking="margin").remasking == "margin"


def test_threshold_below_default_low_threshold_is_not_an_error() -> None:
    # Before the fix any threshold below 0.4 failed with "low_threshold (0.4) must not exceed
    # threshold", naming a field the request never set, even on rules that do not use it.
    assert resolve("dinfer", threshold=0.3).low_threshold == 0.3
    hierarchy = resolve("dinfer_hierarchy", threshold=0.3)
    assert (hierarchy.threshold, hierarchy.low_threshold) == (0.3, 0.3)
    assert resolve("dinfer_hierarchy", threshold=0.6).low_threshold == 0.4
    assert resolve("dinfer_hierarchy", threshold=0.6, low_threshold=0.1).low_threshold == 0.1


def test_resolved_params_are_frozen() -> None:
    params = resolve("dual")
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.threshold = 0.5  # type: ignore[misc]


# -- describe / default ------------------------------------------------------------------------------


def test_describe_presets_lists_every_preset_with_aliases_and_defaults() -> None:
    listing = {p["name"]: p for p in describe_presets()}
    labs = {"nemotron_labs", "nemotron_labs_ar", "nemotron_labs_spec"}
    llada2 = {
        "llada2": ["llada2.0"],
        "llada2_quality": ["llada2.1", "llada2.1_quality"],
        "llada2_speed": ["llada2.1_speed"],
    }
    assert set(listing) == {*FULL_NAMES, "nemotron", *labs, "sdar", "sdar_static", *llada2}
    aliases = {a: name for name, p in listing.items() for a in p["aliases"] if name in FULL_NAMES}
    assert aliases == LLADA_ALIASES
    sdar_aliases = {a: name for name, p in listing.items() for a in p["aliases"] if name.startswith("sdar")}
    assert sdar_aliases == {
        "low_confidence_dynamic": "sdar",
        "sdar_dynamic": "sdar",
        "low_confidence_static": "sdar_static",
    }
    assert {name: listing[name]["aliases"] for name in llada2} == llada2
    assert listing["llada2"]["defaults"]["threshold"] == 0.95  # LLaDA2.0's generate()
    assert listing["llada2_quality"]["defaults"]["editing_threshold"] == 0.5
    assert listing["llada2_speed"]["defaults"]["editing_threshold"] is None
    for name, (cache, rule) in FULL_NAMES.items():
        entry = listing[name]
        assert entry["model_family"] == "llada"
        assert (entry["defaults"]["cache"], entry["defaults"]["rule"]) == (cache, rule)
        assert entry["description"]
    assert listing["nemotron"]["engine"] == "nemotron"
    assert listing["dinfer_blockwise"]["engine"] == "dinfer"
    assert listing["llada"]["engine"] == "fast-dllm"
    defaults = listing["dinfer_credit"]["defaults"]
    assert defaults["block_length"] == 32 and defaults["threshold"] == 0.9
    assert (defaults["credit_alpha"], defaults["credit_gamma"], defaults["credit_beta"]) == (0.7, 0.2, 0.8)
    assert not {"algorithm", "gen_length", "steps", "seed"} & set(defaults)
    assert defaults["max_steps_per_block"] is None  # unbounded by default: dInfer never caps
    assert [p["name"] for p in describe_presets("nemotron")] == ["nemotron"]
    assert [p["name"] for p in describe_presets("sdar")] == ["sdar", "sdar_static"]
    assert listing["sdar"]["defaults"]["threshold"] == 0.9 and listing["sdar"]["engine"] == "sdar"
    assert {p["name"] for p in describe_presets("llada")} == set(FULL_NAMES)
    assert {p["name"] for p in describe_presets("dream")} == set(FULL_NAMES)
    assert {p["name"] for p in describe_presets("nemotron-labs")} == labs


def test_default_preset_per_engine() -> None:
    assert default_preset("auto", "llada") == "dinfer_blockwise"
    assert default_preset("auto", "nemotron") == "nemotron"
    assert default_preset("auto", "nemotron-labs") == "nemotron_labs"
    assert default_preset("fast-dllm", "llada") == "dual_cache"
    assert default_preset("dinfer", "llada") == "dinfer_blockwise"
    assert default_preset("nemotron", "nemotron") == "nemotron"
    with pytest.raises(ValueError, match="cannot serve"):
        default_preset("dinfer", "nemotron")
    with pytest.raises(ValueError, match="unknown engine"):
        default_preset("vllm", "llada")


def test_describe_presets_overlays_the_checkpoints_defaults() -> None:
    """SDAR's block_size 4 (config.json) replaces the presets' block_length, as resolve_params does."""
    listing = describe_presets("sdar", {"block_length": 4, "unknown_knob": 1, "threshold": None})
    assert [p["defaults"]["block_length"] for p in listing] == [4, 4]
    assert all("unknown_knob" not in p["defaults"] for p in listing)
    resolved = resolve_params("sdar", "sdar", 16, model_defaults={"block_length": 4})
    assert resolved.block_length == listing[0]["defaults"]["block_length"]
