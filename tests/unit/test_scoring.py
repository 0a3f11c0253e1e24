"""Likelihood scoring in the engine: mask draws, exactness against enumeration, batching, aborts.

No value of the bundled weights is hard-coded: every expectation is computed from the model.
"""

from __future__ import annotations

import pytest
import torch

from dllm_serve.bench.tasks import heldout_examples
from dllm_serve.config import EngineConfig
from dllm_serve.decoding.likelihood import block_spans, combine, draw_masks
from dllm_serve.engine.algorithms import resolve_params
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.scoring import ScoringEvent, ScoringRequest
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.loader import load_model
from tests.dream_helpers import TINY_DREAM
from tests.helpers import TINY_LLADA
from tests.likelihood_reference import block_causal, exact_expectation
from tests.nemotron_helpers import TINY_NEMOTRON

FAMILIES = {"llada": (TINY_LLADA, None), "nemotron": (TINY_NEMOTRON, 32), "dream": (TINY_DREAM, None)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    path, block = FAMILIES[request.param]
    return load_model(path), block


def _shift(loaded) -> bool:
    """Whether the family predicts position p from the logits at p - 1 (Dream)."""
    return bool(loaded.decode_defaults.get("shift_logits", False))


def _pair(loaded, k: int = 0, n_tokens: int = 3, wrong: bool = False) -> tuple[list[int], list[int]]:
    ex = heldout_examples(k + 1)[k]
    context = loaded.tokenizer.render_chat([{"role": "user", "content": ex.prompt}])
    answer = loaded.tokenizer.encode(ex.answer)[:n_tokens]
    if wrong:
        answer = list(reversed(answer)) if len(set(answer)) > 1 else [t + 1 for t in answer]
    return context, answer


def _score(engine: Engine, requests: list[ScoringRequest]) -> dict[str, ScoringEvent]:
    out: dict[str, ScoringEvent] = {}
    for r in requests:
        engine.add_scoring(r, lambda e: out.__setitem__(e.request_id, e))
    while engine.step():
        pass
    return out


def test_mask_draws_spread_counts_evenly_and_weight_by_length_over_count():
    gen = torch.Generator().manual_seed(3)
    s = draw_masks(5, 40, None, gen)
    assert s.mc_num == 40
    per_count = {m: 0 for m in range(1, 6)}
    for mask, weight, count in zip(s.masks, s.weights, s.counts.tolist(), strict=True):
        m = int(mask.sum())
        per_count[m] += count
        assert torch.equal(weight[mask], torch.full((m,), 5 / m, dtype=torch.float64))
        assert not weight[~mask].any()
    assert per_count == {m: 8 for m in range(1, 6)}  # 40 samples over 5 counts: 8 each
    # Block diffusion: every block of every sample masks at least one token.
    b = draw_masks(7, 30, 3, torch.Generator().manual_seed(4))
    assert block_spans(7, 3) == [(0, 3), (3, 6), (6, 7)]
    for mask in b.masks:
        assert all(mask[s:e].any() for s, e in block_spans(7, 3))
    again = draw_masks(7, 30, 3, torch.Generator().manual_seed(4))
    assert torch.equal(b.masks, again.masks) and torch.equal(b.counts, again.counts)


def test_combine_is_the_mean_and_its_standard_error():
    mean, se = combine([1.0, 3.0], [1, 3])
    assert mean == pytest.approx(2.5)
    assert se == pytest.approx((((1 - 2.5) ** 2 + 3 * (3 - 2.5) ** 2) / 3 / 4) ** 0.5)
    assert combine([2.0], [1]) == (2.0, 0.0)


@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_one_token_with_one_sample_is_the_direct_log_softmax(family, cfg):
    loaded, block = family
    engine = Engine(loaded, EngineConfig())
    context, answer = _pair(loaded, n_tokens=1)
    got = _score(
        engine,
        [
            ScoringRequest(
                "a", context, answer, mc_num=1, cfg_scale=cfg, block_length=block, shift_logits=_shift(loaded)
            )
        ],
    )
    want = exact_expectation(
        loaded.model, context, answer, block, cfg, _shift(loaded)
    )  # one subset: the token itself
    assert got["a"].finish_reason == "stop"
    assert got["a"].logprob == pytest.approx(want, abs=1e-4)
    assert got["a"].stderr == 0.0 and got["a"].forwards == (2 if cfg else 1)


@pytest.mark.parametrize("n_tokens", [2, 3, 4])
def test_estimate_matches_the_enumerated_expectation(family, n_tokens):
    """mc_num 512 lies within 3 standard errors of the exact expectation (all mask subsets)."""
    loaded, block = family
    blocks = [block] if block is None else [block, 2]  # 2: a continuation over several blocks
    for b in blocks:
        for wrong in (False, True):
            context, answer = _pair(loaded, k=n_tokens, n_tokens=n_tokens, wrong=wrong)
            want = exact_expectation(loaded.model, context, answer, b, shift=_shift(loaded))
            got = _score(
                Engine(loaded, EngineConfig()),
                [
                    ScoringRequest(
                        "a", context, answer, mc_num=512, seed=7, block_length=b, shift_logits=_shift(loaded)
                    )
                ],
            )["a"]
            assert got.stderr > 0
            assert abs(got.logprob - want) <= 3 * got.stderr, (b, wrong, got, want)


def test_stderr_shrinks_as_one_over_sqrt_mc_num(family):
    loaded, block = family
    context, answer = _pair(loaded, k=5, n_tokens=4, wrong=True)
    errs = {}
    for mc in (32, 512):
        reqs = [
            ScoringRequest(
                f"s{s}", context, answer, mc_num=mc, seed=s, block_length=block, shift_logits=_shift(loaded)
            )
            for s in range(4)
        ]
        errs[mc] = sum(e.stderr for e in _score(Engine(loaded, EngineConfig()), reqs).values()) / 4
    assert 2.8 < errs[32] / errs[512] < 5.6  # sqrt(512 / 32) = 4


def test_samples_of_many_requests_share_forwards_and_results_do_not_depend_on_the_batch(family):
    loaded, block = family
    pairs = [_pair(loaded, k=k, n_tokens=4, wrong=k % 2 == 1) for k in range(4)]
    reqs = [
        ScoringRequest(f"r{i}", c, a, mc_num=8, seed=11, block_length=block, shift_logits=_shift(loaded))
        for i, (c, a) in enumerate(pairs)
    ]
    alone = {}
    for r in reqs:
        alone.update(_score(Engine(loaded, EngineConfig(max_batch_size=3)), [r]))
    engine = Engine(loaded, EngineConfig(max_batch_size=32))
    together = _score(engine, reqs)
    total_rows = sum(e.forwards for e in together.values())
    assert engine.steps < total_rows / 2  # samples of the four requests shared forwards
    for r in reqs:
        assert together[r.request_id].logprob == alone[r.request_id].logprob  # float32, CPU: bit-equal
        assert together[r.request_id].stderr == alone[r.request_id].stderr


def test_scoring_joins_generation_without_changing_its_tokens(family):
    loaded, block = family
    context, answer = _pair(loaded, n_tokens=4)
    algorithm = "nemotron" if block else "llada"
    params = resolve_params(
        algorithm,
        loaded.family,
        32,
        {"seed": 1},
        model_defaults=loaded.decode_defaults if block else None,
    )
    gen = GenerationRequest("g", context, params, 32)
    want = Engine(loaded, EngineConfig()).run_to_completion([gen])["g"].token_ids
    engine = Engine(loaded, EngineConfig())
    scored: dict[str, ScoringEvent] = {}
    engine.add_scoring(
        ScoringRequest("s", context, answer, mc_num=64, block_length=block, shift_logits=_shift(loaded)),
        lambda e: scored.update(s=e),
    )
    got = engine.run_to_completion([gen])["g"].token_ids
    assert got == want
    assert scored["s"].finish_reason == "stop"


def test_abort_stops_a_scoring_request_within_one_iteration(family):
    loaded, block = family
    context, answer = _pair(loaded, n_tokens=4)
    engine = Engine(loaded, EngineConfig(max_batch_size=2))
    events: list[ScoringEvent] = []
    engine.add_scoring(
        ScoringRequest("a", context, answer, mc_num=4096, block_length=block, shift_logits=_shift(loaded)),
        events.append,
    )
    engine.step()
    engine.step()
    engine.abort("a")
    engine.step()
    assert [e.finish_reason for e in events] == ["abort"]
    assert events[0].forwards == 4
    assert not engine.scheduler.has_work()


def test_greedy_check_commits_the_argmax_and_stops_at_the_first_miss(family):
    loaded, block = family
    context, _answer = _pair(loaded, n_tokens=4)
    engine = Engine(loaded, EngineConfig())
    model = loaded.model
    # The greedy continuation, found by the same rule step by step from the model directly.
    ids = torch.tensor(context + [model.roles.mask_token_id] * 4)
    c = len(context)
    for _ in range(4):
        mask = None
        if block is not None:  # one block: the context in blocks, the continuation sees all
            mask = block_causal(c, 0, len(ids) - c, block)[None]
        out = model(ids[None], torch.arange(len(ids))[None], mask).float()[0]
        logp = torch.log_softmax(out[c - 1 : -1] if _shift(loaded) else out[c:], -1)
        top, arg = logp.max(-1)
        top[ids[c:] != model.roles.mask_token_id] = float("-inf")
        pos = int(top.argmax())
        ids[c + pos] = arg[pos]
    greedy = ids[c:].tolist()
    other = [*greedy[:3], (greedy[3] + 1) % model.vocab_size]
    got = _score(
        engine,
        [
            ScoringRequest(
                "g",
                context,
                greedy,
                mc_num=1,
                check_greedy=True,
                block_length=block,
                shift_logits=_shift(loaded),
            ),
            ScoringRequest(
                "o",
                context,
                other,
                mc_num=1,
                check_greedy=True,
                block_length=block,
                shift_logits=_shift(loaded),
            ),
        ],
    )
    assert got["g"].is_greedy is True and got["g"].forwards == 1 + 4
    assert got["o"].is_greedy is False
