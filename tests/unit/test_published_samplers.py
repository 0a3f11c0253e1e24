"""Fast-dLLM's and dInfer's threshold-style decoders ignore `steps`; the presets bearing their names too.

``fastdllm_*`` below are transcriptions of Fast-dLLM's published per-step choice (a threshold:
the most confident masked position plus every other one reaching it; a factor: the largest n
whose n-th best confidence reaches 1 - factor / (n + 1), at least one) and of its cache-less
``generate`` loop (full canvas every step until the block has no mask; ``steps`` is used only
when neither a threshold nor a factor is set). They are checked on hand-worked cases first.

Expected tokens on the bundled tiny model are computed on the fly from that reference, so no
token id depends on today's weights (the model can be retrained). Fast-dLLM's outputs are the
same at steps = gen and gen / 2; the cached presets are checked for exactly that property (their
per-step choice is the same transcribed rule). Every engine test also runs the engine with the
old behaviour (``max_steps_per_block`` = steps per block, which caps as ``steps`` once did) and
asserts that it differs somewhere, so these tests fail if that divergence comes back.

The factor transcription keeps the published loop's exit exactly: when the first masked position to
miss its bound is the last one, Fast-dLLM commits it anyway (its ``top_i == len - 1`` branch cannot
tell that case from "every bound met"), and so does the engine.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dllm_serve.config import EngineConfig
from dllm_serve.engine.algorithms import resolve_params
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.sequence import GenerationRequest
from tests.helpers import TINY_LLADA

NEG = -math.inf


def fastdllm_threshold(conf: list[float], masked: list[bool], threshold: float) -> list[int]:
    """Positions Fast-dLLM's get_transfer_index commits with a threshold (ties: leftmost first)."""
    ranked = sorted((i for i, m in enumerate(masked) if m), key=lambda i: -conf[i])
    return sorted(ranked[:1] + [i for i in ranked[1:] if conf[i] >= threshold])


def fastdllm_factor(conf: list[float], masked: list[bool], factor: float) -> list[int]:
    """Positions Fast-dLLM's factor loop commits, transcribed step by step: bounds 1 - f / (n + 1)
    for n = 1.. with the first replaced by -1, stop at the first sorted confidence below its bound,
    and add one when stopping at the first or the last index."""
    ranked = sorted((i for i, m in enumerate(masked) if m), key=lambda i: -conf[i])
    bounds = [1 - factor / (n + 1) for n in range(1, len(ranked) + 1)]
    bounds[0] = -1.0
    top_i = 0
    for top_i in range(len(bounds)):  # the loop variable is the result, as published
        if conf[ranked[top_i]] < bounds[top_i]:
            break
    if top_i in (0, len(bounds) - 1):
        top_i += 1
    return sorted(ranked[:top_i])


def llada_split(masks: int, steps: int) -> list[int]:
    """LLaDA's get_num_transfer_tokens: masks / steps per step, the remainder first."""
    return [masks // steps + (1 if i < masks % steps else 0) for i in range(steps)]


def fastdllm_generate(model, prompt, *, steps, gen_length, block_length, threshold=None, factor=None):
    """Fast-dLLM's cache-less ``generate`` at temperature 0 (low_confidence): returns the canvas."""
    mask = model.roles.mask_token_id
    x = torch.tensor(prompt + [mask] * gen_length)
    positions = torch.arange(x.shape[0])[None]
    per_block = steps // (gen_length // block_length)
    for start in range(len(prompt), len(prompt) + gen_length, block_length):
        end = start + block_length
        schedule = llada_split(int((x[start:end] == mask).sum()), per_block)
        i = 0
        while True:
            logits = model(x[None], positions)[0, start:end]
            masked = (x[start:end] == mask).tolist()
            x0 = logits.argmax(-1)
            conf = torch.softmax(logits.double(), -1).gather(-1, x0[:, None]).squeeze(-1).tolist()
            if factor is not None:
                chosen = fastdllm_factor(conf, masked, factor)
            elif threshold is not None:
                chosen = fastdllm_threshold(conf, masked, threshold)
            else:
                ranked = sorted((j for j, m in enumerate(masked) if m), key=lambda j: -conf[j])
                chosen = ranked[: schedule[i]]
            for j in chosen:
                x[start + j] = x0[j]
            i += 1
            if not bool((x[start:end] == mask).any()):
                break
    return x[len(prompt) :].tolist()


# -- the reference on hand-worked cases -------------------------------------------------------------


def test_fastdllm_threshold_hand_cases() -> None:
    conf = [0.5, 0.95, 0.3, 0.92, 0.99]
    masked = [True, True, True, True, False]  # 0.99 is committed already
    assert fastdllm_threshold(conf, masked, 0.9) == [1, 3]
    assert fastdllm_threshold(conf, masked, 0.96) == [1]  # nothing reaches it: the best alone
    assert fastdllm_threshold(conf, masked, 0.5) == [0, 1, 3]  # 0.5 >= 0.5
    assert fastdllm_threshold([0.4, 0.4, 0.1], [True] * 3, 0.9) == [0]  # tie: leftmost


def test_fastdllm_factor_hand_cases() -> None:
    # Bounds 1 - f/(n+1) for f=1: n=1 0.5, n=2 0.667, n=3 0.75, n=4 0.8.
    masked = [True] * 5
    assert fastdllm_factor([0.7, 0.95, 0.8, 0.85, 0.1], masked, 1.0) == [1, 2, 3]  # 0.8 >= .75, .7 < .8
    assert fastdllm_factor([0.35, 0.6, 0.2, 0.1, 0.0], masked, 1.0) == [1]  # .35 < .667: one
    assert fastdllm_factor([0.35, 0.6, 0.2, 0.1, 0.0], masked, 2.0) == [0, 1]  # f=2: .35 >= .333, .2 < .5
    assert fastdllm_factor([0.99, 0.98, 0.97, 0.96, 0.95], masked, 1.0) == [0, 1, 2, 3, 4]
    # The published exit: the first miss is the last masked position (.7 < .8 at n=4 of 4) -> all.
    assert fastdllm_factor([0.7, 0.95, 0.8, 0.85, 0.1], [True] * 4 + [False], 1.0) == [0, 1, 2, 3]
    assert fastdllm_factor([0.1, 0.95, 0.0, 0.0, 0.0], [True, True, False, False, False], 1.0) == [0, 1]


class _Canned:
    """A "model" whose logits at each call come from a list: steps worked out by hand."""

    def __init__(self, steps: list[list[list[float]]], mask: int) -> None:
        self.steps = steps
        self.roles = type("Roles", (), {"mask_token_id": mask})

    def __call__(self, x, positions):
        logits = torch.tensor(self.steps.pop(0)).log()  # probabilities given directly
        return torch.cat([torch.zeros(1, x.shape[1] - logits.shape[0], logits.shape[1]), logits[None]], 1)


def test_fastdllm_generate_hand_case_ignores_steps_under_threshold() -> None:
    """Prompt [0], 4 masks (token 3), one block; threshold 0.9. Step 1 commits only the best (pos 2,
    0.8); step 2 commits 0.95 and 0.91; step 3 the last. A 2-step schedule would have committed 2
    positions at step 1 - the reference takes 3 forwards whatever ``steps`` says."""
    p = [[0.7, 0.3, 0.0], [0.6, 0.4, 0.0], [0.2, 0.8, 0.0], [0.5, 0.5, 0.0]]
    q = [[0.95, 0.05, 0.0], [0.91, 0.09, 0.0], [0.0, 1.0, 0.0], [0.6, 0.4, 0.0]]
    r = [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.3, 0.7]]
    for steps in (4, 2):
        model = _Canned([p, q, r], mask=3)
        out = fastdllm_generate(model, [0], steps=steps, gen_length=4, block_length=4, threshold=0.9)
        assert out == [0, 0, 1, 2] and model.steps == []


# -- the engine against the reference ---------------------------------------------------------------


TEXTS = [
    "Copy the list: a b c d e f g h i j k l m n o p",
    "Replace each letter by the next one: c f a k e q",
    "Upper-case the list: a b c d e f",
    "Add one to each digit: 3 1 4 1 5 9 2 6",
]
RULES = {"threshold": {"threshold": 0.9}, "low-threshold": {"threshold": 0.3}, "factor": {"factor": 1.0}}
GEN, BLOCK = 32, 16


def _prompts(loaded) -> list[list[int]]:
    """Chat prompts for the trained model; raw ids for random weights (whose vocabulary is smaller
    than the tokenizer's)."""
    if Path(loaded.path).resolve() == Path(TINY_LLADA).resolve():
        return [loaded.tokenizer.render_chat([{"role": "user", "content": t}]) for t in TEXTS]
    return [[0, 17, 40, 99, 23], [0, 230, 11], [0, 7, 8, 9, 10, 11, 12, 13, 200]]


def _engine_tokens(loaded, preset: str, prompts, overrides: dict) -> list[tuple[list[int], int]]:
    requests = [
        GenerationRequest(
            f"r{i}", p, resolve_params(preset, "llada", GEN, {**overrides, "early_stop": False}), GEN
        )
        for i, p in enumerate(prompts)
    ]
    results = Engine(loaded, EngineConfig(max_batch_size=8)).run_to_completion(requests)
    return [(results[f"r{i}"].token_ids, results[f"r{i}"].forwards) for i in range(len(prompts))]


def _truncate(tokens: list[int], stops) -> list[int]:
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


@pytest.mark.parametrize("model_name", ["tiny", "random_model"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_llada_threshold_and_factor_match_fastdllm_at_any_steps(request, model_name, rule):
    loaded = request.getfixturevalue(model_name)
    prompts = _prompts(loaded)
    stops = set(Engine(loaded).runner.stop_ids)
    opts = {**RULES[rule], "block_length": BLOCK}
    expected = [
        _truncate(
            fastdllm_generate(loaded.model, p, steps=GEN, gen_length=GEN, block_length=BLOCK, **RULES[rule]),
            stops,
        )
        for p in prompts
    ]
    for steps in (GEN, GEN // 2, GEN // 4):
        got = _engine_tokens(loaded, "llada", prompts, {**opts, "steps": steps})
        assert [tokens for tokens, _ in got] == expected, steps
    if model_name == "random_model":
        # The old behaviour (steps capped every rule) would fail this test: the cap changes tokens.
        capped = _engine_tokens(loaded, "llada", prompts, {**opts, "max_steps_per_block": 2})
        assert [tokens for tokens, _ in capped] != expected
        assert all(forwards == 2 * (GEN // BLOCK) for _, forwards in capped)


@pytest.mark.parametrize("model_name", ["tiny", "random_model"])
@pytest.mark.parametrize(
    "preset", ["prefix_cache", "dual_cache", "dinfer_blockwise", "dinfer_hierarchy", "dinfer_credit"]
)
def test_cached_presets_ignore_steps(request, model_name, preset):
    """Fast-dLLM's and dInfer's threshold-style decoders never read ``steps``: same tokens and
    forwards at steps = gen, gen / 2, gen / 4. On random weights (thresholds rarely reached) a cap
    (max_steps_per_block, the old behaviour of steps) changes them, so this test can fail."""
    loaded = request.getfixturevalue(model_name)
    prompts = _prompts(loaded)
    for rule in ("threshold",) + (("factor",) if preset in ("prefix_cache", "dual_cache") else ()):
        opts = (
            {**RULES[rule], "block_length": BLOCK} if preset != "dinfer_credit" else {"block_length": BLOCK}
        )
        runs = [
            _engine_tokens(loaded, preset, prompts, {**opts, "steps": s}) for s in (GEN, GEN // 2, GEN // 4)
        ]
        assert runs[0] == runs[1] == runs[2], (preset, rule)
        capped = _engine_tokens(loaded, preset, prompts, {**opts, "max_steps_per_block": 2})
        assert all(forwards <= 2 * (GEN // BLOCK) for _, forwards in capped)
        if model_name == "random_model":
            assert capped != runs[0], (preset, rule)
