"""Engine behaviour on the CPU: cache exactness, batch invariance, early stop, isolation, aborts."""

from __future__ import annotations

import threading

import pytest
import torch

from dllm_serve.config import EngineConfig
from dllm_serve.engine.algorithms import presets_for, resolve_params
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.runner import Runner
from dllm_serve.engine.sequence import GenerationRequest, SequenceEvent
from dllm_serve.models.loader import load_model
from tests.helpers import TINY_LLADA

LLADA_PRESETS = tuple(p.name for p in presets_for("llada"))  # the set is pinned in test_algorithms


def _chat(loaded, text: str) -> list[int]:
    return loaded.tokenizer.render_chat([{"role": "user", "content": text}])


def _run(loaded, requests, **config):
    return Engine(loaded, EngineConfig(**config)).run_to_completion(requests)


@pytest.mark.parametrize("preset", ["prefix_cache", "dual_cache", "dinfer_blockwise"])
def test_cache_is_exact_when_every_forward_refreshes(random_model, preset):
    """One step per block: every forward rebuilds the cache, so a cached preset equals no cache."""
    prompt = [0, 40, 41, 42, 43, 44]
    opts = {"rule": "schedule", "steps": 3, "block_length": 8, "early_stop": False, "logits_eos_inf": True}
    want = _run(
        random_model, [GenerationRequest("a", prompt, resolve_params("llada", "llada", 24, opts), 24)]
    )
    got = _run(random_model, [GenerationRequest("a", prompt, resolve_params(preset, "llada", 24, opts), 24)])
    assert got["a"].token_ids == want["a"].token_ids
    assert len(got["a"].token_ids) == 24


def test_vicinity_with_full_warmup_equals_no_cache(random_model):
    """dInfer with warm-up covering the whole block does full forwards only: equal to no cache."""
    prompt = [0, 9, 8, 7]
    opts = {"rule": "schedule", "steps": 16, "block_length": 8, "early_stop": False, "logits_eos_inf": True}
    want = _run(
        random_model, [GenerationRequest("a", prompt, resolve_params("llada", "llada", 16, opts), 16)]
    )
    vic = resolve_params("dinfer_blockwise", "llada", 16, {**opts, "warmup_steps": 8})
    assert _run(random_model, [GenerationRequest("a", prompt, vic, 16)])["a"].token_ids == want["a"].token_ids


def test_cached_block_steps_really_use_the_cache(random_model):
    """With several steps per block, dual cache's block steps see a stale suffix: results may differ,
    but forwards are the same count and refresh forwards are one per block."""
    prompt = [0, 50, 51]
    params = resolve_params(
        "dual_cache", "llada", 16, {"rule": "schedule", "steps": 16, "block_length": 8, "early_stop": False}
    )
    engine = Engine(random_model, EngineConfig())
    infos = []
    engine.step_observers.append(infos.append)
    res = engine.run_to_completion([GenerationRequest("a", prompt, params, 16)])["a"]
    assert res.forwards == 16
    assert sum(i.refresh_forwards for i in infos) == 2


class _ExtraForwardAfterRefresh(Runner):
    """Fast-dLLM's cached loops: after a block's refresh forward, one more cached forward even when
    the refresh committed the whole block (they test for masks after the forward, not before)."""

    def _apply(self, row, block, n_committed, *rest):
        seq = row.seq
        before = seq.block
        committed = super()._apply(row, block, n_committed, *rest)
        if row.plan.refresh and seq.block == before + 1 and not seq.finished:
            seq.block, seq.step_in_block = before, 1  # stay: the next plan is a cached block step
        return committed


@pytest.mark.parametrize("preset", ["prefix_cache", "dual_cache"])
def test_skipping_the_extra_forward_after_a_completing_refresh_keeps_tokens(tiny, preset):
    """The engine moves on as soon as a refresh completes a block; Fast-dLLM's extra cached forward
    finds no masked position and the next block's refresh rewrites the cache: same tokens, fewer
    forwards. The variant really does the extra forwards (checked), so the comparison can fail."""
    texts = ["Copy the list: a b c d e f g h i j k l m n o p", "Upper-case the list: a b c d e f"]
    requests = [
        GenerationRequest(
            f"r{i}",
            _chat(tiny, text),
            resolve_params(preset, "llada", 48, {"block_length": 8, "early_stop": False, "seed": i}),
            48,
        )
        for i, text in enumerate(texts)
    ]
    ours = _run(tiny, requests, max_batch_size=4)
    engine = Engine(tiny, EngineConfig(max_batch_size=4))
    engine.runner = engine.scheduler.runner = _ExtraForwardAfterRefresh(tiny, engine.config)
    theirs = engine.run_to_completion(requests)
    for r in requests:
        assert theirs[r.request_id].token_ids == ours[r.request_id].token_ids, r.request_id
        assert theirs[r.request_id].forwards > ours[r.request_id].forwards, r.request_id


def _mixed_requests(loaded):
    texts = [
        "Copy the list: a b c d e f g h i j k",
        "Reverse the list: q w e r t y u i o p",
        "Sort the digits: 5 3 9 1 0 2 8 7 6 4",
        "Repeat each letter twice: a b c d e",
    ]
    requests = []
    for i, preset in enumerate(LLADA_PRESETS):
        for j, temperature in enumerate((0.0, 0.8)):
            text = texts[(i + j) % len(texts)]
            block = (16, 32)[(i + j) % 2]
            max_tokens = (24, 48, 40)[(i + j) % 3]
            params = resolve_params(
                preset,
                "llada",
                max_tokens,
                {"temperature": temperature, "seed": 10 * i + j, "block_length": block},
            )
            requests.append(GenerationRequest(f"{preset}-{j}", _chat(loaded, text), params, max_tokens))
    return requests


def test_batch_invariance_across_presets(tiny):
    """A request's tokens are the same alone and in a mixed batch of every preset (float32)."""
    requests = _mixed_requests(tiny)
    together = _run(tiny, requests, max_batch_size=len(requests))
    for req in requests:
        alone = _run(tiny, [req])[req.request_id]
        assert together[req.request_id].token_ids == alone.token_ids, req.request_id
        assert together[req.request_id].forwards == alone.forwards, req.request_id


def test_early_stop_saves_forwards_and_keeps_tokens(tiny):
    prompt = _chat(tiny, "Copy the list: a b c d e f g h i j")
    runs = {}
    for early in (True, False):
        params = resolve_params("dual_cache", "llada", 128, {"early_stop": early, "block_length": 16})
        runs[early] = _run(tiny, [GenerationRequest("a", prompt, params, 128)])["a"]
    assert runs[True].token_ids == runs[False].token_ids
    assert runs[True].finish_reason == runs[False].finish_reason == "stop"
    assert runs[True].forwards < runs[False].forwards


def test_max_tokens_shortens_the_canvas(tiny):
    params = resolve_params("llada", "llada", 5, {"block_length": 4})
    assert params.gen_length == 8
    res = _run(
        tiny, [GenerationRequest("a", _chat(tiny, "Copy the list: a b c d e f g h i j k l"), params, 5)]
    )["a"]
    assert len(res.token_ids) <= 5
    assert res.forwards <= 8
    if not res.stopped_on_token:
        assert res.finish_reason == "length" and len(res.token_ids) == 5


def test_one_bad_request_fails_alone(random_model):
    """A token id outside the vocabulary breaks the batched forward; only its request fails."""
    good = [
        GenerationRequest(f"g{i}", [0, 10 + i, 11], resolve_params("dual_cache", "llada", 8, {}), 8)
        for i in range(3)
    ]
    bad = GenerationRequest("bad", [0, 10_000], resolve_params("dual_cache", "llada", 8, {}), 8)
    results = _run(random_model, [*good, bad], max_batch_size=4)
    assert results["bad"].finish_reason == "error" and results["bad"].error
    alone = _run(random_model, good)
    for g in good:
        assert results[g.request_id].finish_reason != "error"
        assert results[g.request_id].token_ids == alone[g.request_id].token_ids


@pytest.mark.parametrize("preset", ["llada", "dual_cache"])
def test_nan_logits_fail_only_their_request(preset):
    """A token whose embedding is NaN poisons its own row's logits (attention never mixes rows):
    that request ends with a numerical error, the others in its batch are untouched."""
    loaded = load_model(TINY_LLADA)
    poison = 50
    with torch.no_grad():
        loaded.model.embed.weight[poison] = float("nan")
    params = resolve_params(preset, "llada", 16, {"block_length": 16})
    good = [GenerationRequest(f"g{i}", _chat(loaded, f"Copy: {'abc'[i]} b c"), params, 16) for i in range(3)]
    bad = GenerationRequest("bad", [*good[0].prompt_ids, poison], params, 16)
    results = _run(loaded, [good[0], bad, *good[1:]], max_batch_size=4)
    assert results["bad"].finish_reason == "error"
    assert "NaN or infinite logits" in results["bad"].error
    alone = _run(loaded, good)
    for g in good:
        assert results[g.request_id].finish_reason in {"stop", "length"}
        assert results[g.request_id].token_ids == alone[g.request_id].token_ids


def test_too_long_request_is_refused_with_numbers(random_model):
    params = resolve_params("llada", "llada", 256, {})
    res = _run(random_model, [GenerationRequest("a", [0] * 10, params, 256)])["a"]
    assert res.finish_reason == "error"
    assert "10" in res.error and "256" in res.error


def test_abort_frees_the_kv_extent_within_one_iteration(tiny):
    """On the engine thread: an aborted request ends with 'abort' and its KV extent is free again."""
    engine = Engine(tiny, EngineConfig(max_batch_size=2))
    engine.start()
    try:
        events: list[SequenceEvent] = []
        done = threading.Event()

        def sink(event: SequenceEvent) -> None:
            events.append(event)
            if event.finished:
                done.set()

        params = resolve_params("dual_cache", "llada", 256, {"early_stop": False, "threshold": 1.0})
        engine.add_request(GenerationRequest("long", _chat(tiny, "Copy the list: a b c"), params, 256), sink)
        while engine.stats().running == 0:
            done.wait(0.01)
        assert engine.runner.pool.used > 0
        engine.abort("long")
        assert done.wait(10)
        assert events[-1].finish_reason == "abort"
        assert engine.runner.pool.used == 0
    finally:
        engine.shutdown(drain_timeout=1)


@pytest.mark.parametrize(
    ("model", "family", "preset"),
    [
        ("tiny-llada", "llada", "llada"),
        ("tiny-llada", "llada", "dinfer_blockwise"),
        ("tiny-nemotron", "nemotron", "nemotron"),
        ("tiny-llada2", "llada2", "llada2"),
        ("tiny-sdar", "sdar", "sdar"),
        ("tiny-dream", "dream", "dream_entropy"),
        ("tiny-dream", "dream", "dream_origin"),
        ("tiny-nemotron-labs", "nemotron-labs", "nemotron_labs"),
        ("tiny-nemotron-labs", "nemotron-labs", "nemotron_labs_spec"),
        ("tiny-nemotron-labs", "nemotron-labs", "nemotron_labs_ar"),
    ],
)
def test_a_model_that_predicts_its_mask_token_still_finishes(model, family, preset):
    """The mask token is never chosen (decoding/step.py). Without that, a head that favours it
    leaves positions masked: a threshold rule's block never finished (the engine looped)."""
    loaded = load_model(TINY_LLADA.parent / model)
    mask = loaded.model.roles.mask_token_id
    plain = loaded.model.logits
    loaded.model.logits = (
        lambda hidden: plain(hidden).index_add(  # type: ignore[method-assign]
            -1, torch.tensor([mask]), torch.full((*hidden.shape[:-1], 1), 50.0)
        )
    )
    prompt = _chat(loaded, "Copy the list: a b c")
    params = resolve_params(preset, family, 40, {"early_stop": False})
    engine = Engine(loaded, EngineConfig())
    steps = 0

    def bounded() -> bool:
        nonlocal steps
        steps += 1
        assert steps < 500, "the engine kept stepping"
        return engine.step()

    result = engine.run_to_completion([GenerationRequest("a", prompt, params, 40)], step=bounded)["a"]
    assert result.finish_reason in ("stop", "length")
    assert mask not in result.token_ids
