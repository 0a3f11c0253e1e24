"""Likelihood scoring with blocks at absolute positions (SDAR, LLaDA2: attention kinds
``aligned_block_causal`` and ``block_aligned``).

The layout is compared with the trainers' own batches (scripts/train_tiny.py's
``aligned_block_diffusion_batch`` for SDAR, scripts/tiny_llada2.py's ``aligned_batch`` for LLaDA2)
at context lengths that are and are not multiples of the block; the values with forwards of a
random SDAR under a hand-built absolute-block mask (tests/likelihood_reference.py); and at a
multiple of the block the layout is the block-causal one, token for token.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from dllm_serve.config import EngineConfig
from dllm_serve.decoding.likelihood import block_spans, draw_masks
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.scoring import ScoringEvent, ScoringRequest, TokenLogprobRequest
from dllm_serve.engine.scoring_rows import CLEAN, NOISY, Row, attention_masks, forward_rows, row_layout
from dllm_serve.models import registry
from dllm_serve.models.loader import load_model
from tests.likelihood_reference import aligned_block_causal, aligned_spans, exact_expectation, masked_logprobs
from tests.sdar_helpers import random_sdar_config, random_sdar_weights, write_sdar_checkpoint

REPO = Path(__file__).resolve().parents[2]
B = 4  # block length
MASK = 3


@pytest.fixture(scope="module")
def trainer():
    """scripts/train_tiny.py as a module (it imports scripts/tiny_llada2.py, LLaDA2's objective)."""
    spec = importlib.util.spec_from_file_location("train_tiny", REPO / "scripts" / "train_tiny.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sdar(tmp_path_factory):
    cfg = random_sdar_config()
    path = tmp_path_factory.mktemp("sdar") / "m"
    return load_model(write_sdar_checkpoint(path, cfg, random_sdar_weights(cfg, scale=0.3)))


def _mask(layout) -> torch.Tensor:
    no = torch.tensor([False])
    return attention_masks(layout.kinds[None], layout.blocks[None], no, no)[0]


def _training_batch(trainer, family: str, context: list[int], continuation: list[int]) -> dict:
    gen = torch.Generator().manual_seed(0)
    if family == "sdar":
        return trainer.aligned_block_diffusion_batch([context], [continuation], B, MASK, 0, gen)
    return trainer.tiny_llada2.aligned_batch([context], [continuation], MASK, 0, gen, block=B)


def test_the_engine_scores_aligned_exactly_for_the_registry_s_aligned_attention_kinds(sdar):
    kinds = {spec.name: spec.attention for spec in registry.FAMILIES}
    assert kinds["sdar"] == "aligned_block_causal" and kinds["llada2"] == "block_aligned"
    assert kinds["nemotron"] == "block_causal"
    engine = Engine(sdar, EngineConfig())
    assert engine.aligned_scoring and engine.block_diffusion


@pytest.mark.parametrize("family", ["sdar", "llada2"])
@pytest.mark.parametrize("c", [0, 3, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_layout_is_the_training_objective_s_two_copy_layout(trainer, family, c, n):
    """Each engine token is a token of the trainer's row (clean copy at position p, or noisy copy at
    p); the visibility between them is the trainer's, the trainer's tokens the engine leaves out
    (the clean copy of the last block) are seen by none of those it keeps, and every noisy-copy
    token is there, the context's tokens of the shared block unmasked."""
    context, continuation = list(range(20, 20 + c)), list(range(60, 60 + n))
    lay = row_layout(context, continuation, MASK, B, False, aligned=True)
    batch = _training_batch(trainer, family, context, continuation)
    first = c // B * B
    clean_len = c + n  # the trainer's clean copy: the whole sequence
    noisy = lay.kinds == NOISY
    assert bool(((lay.kinds == CLEAN) | noisy).all())
    idx = torch.where(noisy, clean_len + lay.positions - first, lay.positions)
    t_mask, t_pos, t_ids = batch["mask"][0], batch["positions"][0], batch["ids"][0]
    width = clean_len + (c + n - first)
    assert sorted(idx.tolist()) == sorted(set(idx.tolist()))
    assert set(range(clean_len, width)) <= set(idx.tolist())  # the whole noisy copy
    assert torch.equal(lay.positions, t_pos[idx])
    assert torch.equal(_mask(lay), t_mask[idx][:, idx])
    dropped = torch.tensor(sorted(set(range(width)) - set(idx.tolist())), dtype=torch.long)
    assert not t_mask[idx][:, dropped].any()  # leaving them out changes no kept token's output
    # Ids: every token but the noisy continuation is the trainer's clean token there.
    keep = torch.arange(lay.length) < lay.noisy_start
    assert torch.equal(lay.ids[keep], t_ids[idx[keep]])
    assert bool((lay.ids[lay.noisy_start :] == MASK).all())
    # The continuation's logits are read at the trainer's noisy-copy indices.
    assert torch.equal(idx[lay.predict], batch["noisy_index"][0, -n:])
    assert torch.equal(lay.context, lay.positions < c)  # both copies of the context: the cfg row masks them
    # The estimator's blocks are the absolute blocks' continuation pieces.
    assert lay.spans == aligned_spans(c, n, B)


@pytest.mark.parametrize(("c", "n"), [(4, 3), (8, 6), (8, 1), (12, 9)])
def test_at_a_multiple_of_the_block_the_layout_is_the_block_causal_one(c, n):
    """Unchanged by construction where the context ends on a block boundary: same ids, positions,
    visibility, logits indices and mask draws as the block-causal (Nemotron) layout."""
    context, continuation = list(range(20, 20 + c)), list(range(60, 60 + n))
    for shift in (False, True):
        new = row_layout(context, continuation, MASK, B, shift, aligned=True)
        old = row_layout(context, continuation, MASK, B, shift)
        assert torch.equal(new.ids, old.ids) and torch.equal(new.positions, old.positions)
        assert torch.equal(_mask(new), _mask(old)) and torch.equal(new.predict, old.predict)
        assert new.noisy_start == old.noisy_start and torch.equal(new.context, old.context)
        assert new.spans == old.spans == block_spans(n, B)
    a = draw_masks(n, 16, B, torch.Generator().manual_seed(1), new.block_offset)
    b = draw_masks(n, 16, B, torch.Generator().manual_seed(1))
    assert torch.equal(a.masks, b.masks) and torch.equal(a.weights, b.weights)


def test_aligned_mask_draws_cover_each_absolute_block_with_its_own_weights():
    """Context 7, block 4: the continuation's first block holds one of its tokens (weight 1), then
    whole blocks; every block of every sample masks at least one token, weight L_b / m_b."""
    s = draw_masks(6, 64, B, torch.Generator().manual_seed(2), offset=3)
    spans = block_spans(6, B, 3)
    assert spans == [(0, 1), (1, 5), (5, 6)]
    for mask, weight in zip(s.masks, s.weights, strict=True):
        for start, end in spans:
            m = int(mask[start:end].sum())
            assert m >= 1
            assert torch.equal(
                weight[start:end][mask[start:end]], torch.full((m,), (end - start) / m, dtype=torch.float64)
            )


def _score(engine: Engine, requests) -> dict[str, ScoringEvent]:
    out: dict[str, ScoringEvent] = {}
    for r in requests:
        engine.add_scoring(r, lambda e: out.__setitem__(e.request_id, e))
    while engine.step():
        pass
    return out


def _pair(c: int, n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 300, (c,), generator=g).tolist(), torch.randint(
        10, 300, (n,), generator=g
    ).tolist()


@pytest.mark.parametrize("c", [5, 6, 7, 8])
@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_one_token_is_the_log_softmax_of_a_forward_under_the_absolute_block_mask(sdar, c, cfg):
    context, answer = _pair(c, 1, seed=c)
    got = _score(
        Engine(sdar, EngineConfig()),
        [ScoringRequest("a", context, answer, mc_num=1, cfg_scale=cfg, block_length=B, aligned=True)],
    )["a"]
    (want,) = masked_logprobs(sdar.model, context, answer, (0, 1), [(0,)], B, cfg, aligned=True)
    assert got.finish_reason == "stop" and got.stderr == 0.0
    assert got.logprob == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("c", [5, 6, 7, 8])
@pytest.mark.parametrize("shift", [False, True])
def test_a_fixed_mask_pattern_gives_each_block_s_forward_under_the_absolute_block_mask(sdar, c, shift):
    """One engine row (two copies) against one hand-masked one-copy forward per absolute block;
    ``shift``: each token read from the logits one position earlier (the clean copy's at a block's
    first token), as for a family with shifted logits."""
    context, answer = _pair(c, 7, seed=10 + c)
    target = torch.tensor(answer)
    masked = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    mask_id = sdar.model.roles.mask_token_id
    lay = row_layout(context, answer, mask_id, B, shift, aligned=True)
    row = Row(lay, torch.where(masked, mask_id, target), target, masked.nonzero()[:, 0], 0.0, 1, None, None)
    (out,) = forward_rows(sdar.model, [row], mask_id)
    got = dict(zip(row.wanted.tolist(), out.target_logprob.tolist(), strict=True))
    for start, end in aligned_spans(c, len(answer), B):
        subset = tuple(i for i in range(start, end) if masked[i])
        if subset:
            (want,) = masked_logprobs(
                sdar.model, context, answer, (start, end), [subset], B, 0.0, shift, aligned=True
            )
            assert sum(got[i] for i in subset) == pytest.approx(want, abs=1e-4), (start, end)


def test_estimate_matches_the_enumerated_expectation_under_absolute_blocks(sdar):
    """Context 6, three continuation tokens over two absolute blocks: 512 samples within three
    standard errors of the exact expectation, which differs from the block-causal layout's."""
    context, answer = _pair(6, 3, seed=3)
    want = exact_expectation(sdar.model, context, answer, B, aligned=True)
    other = exact_expectation(sdar.model, context, answer, B)
    got = _score(
        Engine(sdar, EngineConfig()),
        [ScoringRequest("a", context, answer, mc_num=512, seed=7, block_length=B, aligned=True)],
    )["a"]
    assert got.stderr > 0 and abs(got.logprob - want) <= 3 * got.stderr, (got, want)
    assert abs(other - want) > 1e-3


def test_results_do_not_depend_on_the_batch(sdar):
    # Rows of 38-46 tokens, padded or not inside one block of the CPU attention kernel's keys:
    # padding a row across 32 keys changes its last bits on CPU, whatever the layout (Nemotron's too).
    pairs = [_pair(c, 5, seed=c) for c in (33, 34, 35, 36)]
    reqs = [
        ScoringRequest(f"r{i}", c, a, mc_num=8, seed=11, block_length=B, aligned=True, check_greedy=True)
        for i, (c, a) in enumerate(pairs)
    ]
    alone = {}
    for r in reqs:
        alone.update(_score(Engine(sdar, EngineConfig(max_batch_size=3)), [r]))
    together = _score(Engine(sdar, EngineConfig(max_batch_size=32)), reqs)
    for r in reqs:
        a, t = alone[r.request_id], together[r.request_id]
        assert (t.logprob, t.stderr, t.is_greedy) == (a.logprob, a.stderr, a.is_greedy)


@torch.inference_mode()
def _greedy(model, context: list[int], n: int) -> list[int]:
    """Reference greedy continuation: absolute block by block, commit the most confident masked
    position's argmax, each forward one row under the absolute-block mask."""
    mask_id = model.roles.mask_token_id
    c = len(context)
    ids = torch.tensor(context + [mask_id] * n)
    for start, end in aligned_spans(c, n, B):
        row = ids[: c + end]
        for _ in range(end - start):
            out = model(row[None], torch.arange(c + end)[None], aligned_block_causal(c, start, end, B)[None])
            top, arg = torch.log_softmax(out[0].float()[c + start :], -1).max(-1)
            top[row[c + start :] != mask_id] = float("-inf")
            pos = int(top.argmax())
            row[c + start + pos] = arg[pos]
    return ids[c:].tolist()


@pytest.mark.parametrize("c", [6, 7])
def test_greedy_check_and_echo_s_generated_token_decode_the_absolute_blocks(sdar, c):
    context, _ = _pair(c, 1, seed=20 + c)
    greedy = _greedy(sdar.model, context, 4)
    other = [*greedy[:3], (greedy[3] + 1) % sdar.model.vocab_size]
    common = dict(mc_num=1, check_greedy=True, block_length=B, aligned=True)
    got = _score(
        Engine(sdar, EngineConfig()),
        [ScoringRequest("g", context, greedy, **common), ScoringRequest("o", context, other, **common)],
    )
    assert got["g"].is_greedy is True and got["g"].forwards == 1 + 4
    assert got["o"].is_greedy is False
    echo = _score(
        Engine(sdar, EngineConfig()),
        [TokenLogprobRequest("e", context, score_prompt=False, generate=1, block_length=B, aligned=True)],
    )["e"]
    assert echo.generated[0].token == _greedy(sdar.model, context, 1)[0]
