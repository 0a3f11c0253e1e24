"""Quality bars of the bundled tiny-llada on the held-out synthetic tasks (>= 200 prompts).

- the reference sampler (`llada`, one token per step) reaches >= 95 % exact match;
- every fast preset stays within 2 points of it while using fewer forwards per token, and the
  cached threshold presets (dual_cache, dinfer_blockwise) use at most half of llada's.
"""

from __future__ import annotations

import pytest

from dllm_serve.commands import evaluate
from dllm_serve.config import EngineConfig
from dllm_serve.engine.algorithms import presets_for
from dllm_serve.engine.engine import Engine
from dllm_serve.models.loader import load_model
from tests.helpers import TINY_LLADA

PROMPTS = 200
GEN_LENGTH = 64


@pytest.fixture(scope="module")
def reports():
    loaded = load_model(TINY_LLADA)
    out = {}
    for preset in (p.name for p in presets_for("llada")):  # the set is pinned in test_algorithms
        engine = Engine(loaded, EngineConfig(max_batch_size=64))
        out[preset] = evaluate(engine, preset, PROMPTS, GEN_LENGTH, {})
    return out


def test_reference_sampler_accuracy(reports):
    ref = reports["llada"]
    assert ref["num_prompts"] >= 200
    assert ref["accuracy"] >= 95.0, ref
    assert ref["params"]["steps"] == ref["params"]["gen_length"]  # one token per step


@pytest.mark.parametrize(
    "preset", ["prefix_cache", "dual_cache", "dinfer_blockwise", "dinfer_hierarchy", "dinfer_credit"]
)
def test_fast_preset_keeps_quality_with_fewer_forwards(reports, preset):
    ref, fast = reports["llada"], reports[preset]
    assert fast["accuracy"] >= ref["accuracy"] - 2.0, (preset, fast["accuracy"], ref["accuracy"])
    assert fast["forwards_per_token"] < ref["forwards_per_token"]
    if preset in ("dual_cache", "dinfer_blockwise"):
        assert fast["forwards_per_token"] <= 0.5 * ref["forwards_per_token"], fast
