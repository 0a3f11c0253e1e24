"""The decoding table (decoding/registry.py) and what is derived from it: validation, the request
schema, the CLI flags, the model description, and the decoding step itself."""

from __future__ import annotations

import argparse
import typing

import pytest
import torch

from dllm_serve.commands import add_decoding_arguments, decoding_overrides
from dllm_serve.config import EngineConfig
from dllm_serve.decoding import rules
from dllm_serve.decoding.registry import REMASKING, RULES, Rule
from dllm_serve.engine.algorithms import (
    KNOBS,
    OVERRIDABLE,
    DecodeParams,
    ParamError,
    describe_parameters,
    describe_rules,
    resolve_params,
)
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.loader import load_model
from dllm_serve.protocol import DiffusionFields
from tests.helpers import TINY_LLADA


def test_every_rule_parameter_is_a_numeric_knob() -> None:
    hints = typing.get_type_hints(DecodeParams)
    for rule in RULES.values():
        for name in rule.parameters:
            assert name in KNOBS and hints[name] is float, (rule.name, name)
        assert (rule.edit_logits is not None) == rule.stateful
    assert [r["name"] for r in describe_rules()] == list(RULES)
    credit = next(r for r in describe_rules() if r["name"] == "credit")
    assert credit["keeps_state"] and credit["parameters"][-3:] == [
        "credit_alpha",
        "credit_gamma",
        "credit_beta",
    ]


def test_schema_flags_and_description_follow_the_knobs() -> None:
    assert set(DiffusionFields.model_fields) == set(OVERRIDABLE) == set(KNOBS)
    assert DiffusionFields.model_fields["threshold"].description == KNOBS["threshold"].help
    assert {p["name"] for p in describe_parameters()} == set(KNOBS)
    parser = argparse.ArgumentParser()
    add_decoding_arguments(parser)
    args = parser.parse_args(["--threshold", "0.5", "--no-early-stop", "--rule", "factor", "--seed", "3"])
    assert decoding_overrides(args) == {"threshold": 0.5, "early_stop": False, "rule": "factor", "seed": 3}
    assert decoding_overrides(parser.parse_args([])) == {}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rule", "nope"),
        ("remasking", "nope"),
        ("threshold", 1.5),
        ("top_p", 0.0),
        ("seed", -1),
        ("early_stop", 1),
    ],
)
def test_each_knob_is_validated_from_its_metadata(field, value) -> None:
    with pytest.raises(ParamError) as info:
        resolve_params("llada", "llada", 32, {field: value})
    assert info.value.param == field


def test_drawn_remasking_needs_a_fixed_step_rule() -> None:
    assert REMASKING["random"].drawn and RULES["schedule"].fixed_steps
    assert resolve_params("llada", "llada", 32, {"remasking": "random"}).remasking == "random"
    with pytest.raises(ParamError, match="fixed schedule"):
        resolve_params("dual_cache", "llada", 32, {"remasking": "random"})


def _top2(conf: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """A toy rule: the two most confident candidates, whatever the floor."""
    two = torch.full((conf.shape[0],), 2, dtype=torch.long, device=conf.device)
    return rules.top_k_mask(conf, candidates, two)


def test_a_rule_added_to_the_table_is_served_end_to_end(monkeypatch) -> None:
    """One registry entry is all a new rule needs: validation accepts its name, the step runs it,
    and it commits what it selects (two positions per step: half the forwards of one per step)."""
    monkeypatch.setitem(RULES, "top2", Rule("top2", "two per step", _top2))
    engine = Engine(load_model(TINY_LLADA), EngineConfig())
    prompt = engine.loaded.tokenizer.encode("add 2 and 3")
    params = resolve_params("dual_cache", "llada", 32, {"rule": "top2", "seed": 0})
    assert params.step_budget is None
    result = engine.run_to_completion(
        [
            GenerationRequest(
                "r",
                prompt,
                params,
                32,
            )
        ]
    )["r"]
    assert result.finish_reason in {"stop", "length"}
    assert result.forwards <= 16 + 1  # 32 positions, 2 per forward (a block's last may take one)
    assert "top2" in [r["name"] for r in describe_rules()]


def test_a_row_constraint_decides_what_can_be_chosen() -> None:
    """The constraint hook runs before the choice: a row allowed one token gets it at every
    position, and its confidence is ranked among the allowed tokens only; other rows are untouched."""
    from dllm_serve.decoding.step import NoiseSpan, RowStep, decide

    def only_seven(logits: torch.Tensor, block: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        allowed = torch.full_like(logits, float("-inf"))
        allowed[:, 7] = 0.0
        return logits + allowed

    params = resolve_params("dual_cache", "llada", 8, {"block_length": 8})
    logits = torch.randn(2, 8, 20, generator=torch.Generator().manual_seed(0))
    plain = logits[1].argmax(-1)
    rows = [RowStep(params, 8, 1, NoiseSpan(torch.Generator(), 8), constraint=c) for c in (only_seven, None)]
    step = decide(
        logits, block=torch.zeros(2, 8, dtype=torch.long), rows=rows, mask_id=0, eos_id=1, eot_id=None
    )
    assert step.tokens[0].tolist() == [7] * 8
    assert torch.allclose(step.conf[0], torch.ones(8))  # the only allowed token has probability 1
    assert torch.equal(step.tokens[1], plain)
    assert step.commit[0].all()  # confidence 1 >= threshold 0.9 everywhere
