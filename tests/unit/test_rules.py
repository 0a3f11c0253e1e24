"""Commit rules (decoding/rules.py) and the linear-schedule floor (Sequence.floor_commits).

Every expectation is worked out by hand from the rule's definition and written in the test; a
few property checks compare against small plain-Python restatements of those definitions.
"""

from __future__ import annotations

import math

import pytest
import torch

from dllm_serve.decoding import rules
from dllm_serve.decoding.registry import RULES
from dllm_serve.decoding.step import select_commits
from dllm_serve.engine.algorithms import DecodeParams
from dllm_serve.engine.sequence import GenerationRequest, Sequence

T, F = True, False
NEG_INF = float("-inf")
RULE_NAMES = list(RULES)  # schedule, threshold, factor, hierarchy, credit


def knobs(threshold: torch.Tensor, factor: torch.Tensor, low: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"threshold": threshold, "factor": factor, "low_threshold": low}


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def b(rows: list[list[bool]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def positions(mask: torch.Tensor) -> list[list[int]]:
    """Committed positions per row, for readable assertions."""
    return [row.nonzero().flatten().tolist() for row in mask]


# -- confidence_ranks / top_k_mask / threshold_mask ------------------------------------------------


def test_confidence_ranks_ties_left_to_right_and_non_candidates_last() -> None:
    conf = t([[0.5, 0.9, 0.9, 0.99, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    cand = b([[T, T, T, F, T], [T, F, T, T, F]])
    ranks = rules.confidence_ranks(conf, cand)
    # Row 0: 0.9 (pos 1) before 0.9 (pos 2), then 0.5, 0.3; the 0.99 is committed, so last.
    # Row 1: all tied, candidates 0, 2, 3 in order, then the non-candidates 1, 4 in order.
    assert ranks.tolist() == [[2, 0, 1, 4, 3], [0, 3, 1, 2, 4]]


def test_confidence_ranks_candidate_at_minus_inf_still_beats_non_candidates() -> None:
    conf = t([[0.7, NEG_INF, 0.5]])
    cand = b([[F, T, T]])
    assert rules.confidence_ranks(conf, cand).tolist() == [[2, 1, 0]]
    # Both candidates are committed with k = 2 (before the fix the non-candidate took rank 1).
    assert positions(rules.top_k_mask(conf, cand, torch.tensor([2]))) == [[1, 2]]


def test_top_k_mask_per_row_k() -> None:
    conf = t([[0.1, 0.8, 0.6, 0.9], [0.1, 0.8, 0.6, 0.9], [0.1, 0.8, 0.6, 0.9], [0.4, 0.4, 0.4, 0.4]])
    cand = b([[T, T, T, F], [T, T, T, F], [T, T, T, F], [T, T, T, T]])
    k = torch.tensor([1, 2, 0, 3])
    # k above the candidate count commits every candidate and never a non-candidate.
    assert positions(rules.top_k_mask(conf, cand, k)) == [[1], [1, 2], [], [0, 1, 2]]
    assert positions(rules.top_k_mask(conf[:1], cand[:1], torch.tensor([10]))) == [[0, 1, 2]]


def test_threshold_mask_per_row_and_boundary() -> None:
    conf = t([[0.5, 0.9, 0.95, 0.99], [0.5, 0.75, 0.7, 0.99]])
    cand = b([[T, T, T, F], [T, T, T, F]])
    # Equality counts (0.9 >= 0.9, 0.75 >= 0.75); the committed 0.99 never does.
    assert positions(rules.threshold_mask(conf, cand, t([[0.9], [0.75]]).flatten())) == [[1, 2], [1]]


# -- factor_count -----------------------------------------------------------------------------------
# Bounds 1 - f/(n+1):  f=1 -> 0.5, 0.667, 0.75, 0.8, 0.833   f=2 -> 0, 0.333, 0.5, 0.6, 0.667
#                      f=0.5 -> 0.75, 0.833, 0.875, 0.9


def test_factor_count_hand_cases_rows_with_different_factors() -> None:
    conf = t(
        [
            [0.7, 0.95, 0.8, 0.85, 0.6],  # f=1, sorted 0.95 .85 .8 .7 .6: .8 >= .75, .7 < .8 -> 3
            [0.74, 0.9, 0.75, 0.8, 0.6],  # f=1, 0.75 == 0.75 passes at n=3, 0.74 < 0.8 -> 3
            [0.7499, 0.9, 0.8, 0.1, 0.0],  # f=1, 0.7499 < 0.75 at n=3 -> 2
            [0.6, 0.55, 0.5, 0.45, 0.4],  # f=2, 0.5 == 0.5 at n=3, 0.45 < 0.6 -> 3
            [0.7, 0.6, 0.5, 0.4, 0.3],  # f=0.5, 0.7 < 0.75 already at n=1 -> at least 1
            [0.99, 0.97, 0.95, 0.92, 0.9],  # f=1, all pass (0.9 >= 0.833) -> 5
            # Fast-dLLM's quirk: the first miss is the last candidate (.7 < .8 at n=4 of 4) -> all 4.
            [0.7, 0.95, 0.8, 0.85, 0.99],
        ]
    )
    cand = b([[T] * 5, [T] * 5, [T, T, T, T, F], [T] * 5, [T] * 5, [T] * 5, [T, T, T, T, F]])
    factor = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.5, 1.0, 1.0])
    assert rules.factor_count(conf, cand, factor).tolist() == [3, 3, 2, 3, 1, 5, 4]


def test_factor_count_ignores_confident_non_candidates() -> None:
    # The committed 0.99s would pass every bound; only the one candidate (0.2) counts -> 1.
    conf = t([[0.99, 0.2, 0.99]])
    assert rules.factor_count(conf, b([[F, T, F]]), torch.tensor([1.0])).tolist() == [1]


def test_factor_count_matches_definition_on_random_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        p = int(torch.randint(1, 10, (), generator=gen))
        conf = torch.rand((1, p), generator=gen)
        cand = torch.rand((1, p), generator=gen) < 0.7
        f = [0.25, 0.5, 1.0, 2.0, 3.0][int(torch.randint(0, 5, (), generator=gen))]
        # The definition, in float64 on the same float32 confidences.
        c = sorted((x for x, m in zip(conf[0].tolist(), cand[0].tolist(), strict=True) if m), reverse=True)
        # Fast-dLLM's loop: the first always passes; a first miss at the last candidate commits it too.
        first_miss = next((i for i in range(1, len(c)) if c[i] < 1 - f / (i + 2)), len(c))
        expected = max(1, len(c) if first_miss == len(c) - 1 else first_miss)
        got = rules.factor_count(conf, cand, torch.tensor([f])).item()
        assert got == expected, (conf, cand, f)


# -- hierarchy_mask ---------------------------------------------------------------------------------


def test_hierarchy_mask_runs_best_position_and_thresholds() -> None:
    conf = t(
        [
            # runs [0,1,2] [4,5] [7]; best 0.6 at 1 and 2 -> leftmost 1; 0.45 at 4; 0.35 < 0.4.
            [0.5, 0.6, 0.6, 0.99, 0.45, 0.3, 0.1, 0.35],
            # same layout: 0.95 and 0.92 >= 0.9 both commit; run [4,5] best 0.5 at 5; run [7] 0.41.
            [0.95, 0.92, 0.3, 0.99, 0.2, 0.5, 0.1, 0.41],
            # one run over the whole block; only its best (pos 6, 0.8) clears low_threshold 0.7.
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 0.75],
        ]
    )
    cand = b([[T, T, T, F, T, T, F, T], [T, T, T, F, T, T, F, T], [T] * 8])
    threshold = torch.tensor([0.9, 0.9, 0.85])
    low = torch.tensor([0.4, 0.4, 0.7])
    assert positions(rules.hierarchy_mask(conf, cand, threshold, low)) == [[1, 4], [0, 1, 5, 7], [6]]


def test_hierarchy_mask_low_threshold_boundary_and_single_mask() -> None:
    conf = t([[0.9, 0.4, 0.9], [0.9, 0.39, 0.9], [0.3, 0.2, 0.1]])
    cand = b([[F, T, F], [F, T, F], [T, T, T]])
    threshold = torch.tensor([0.9, 0.9, 0.9])
    low = torch.tensor([0.4, 0.4, 0.4])
    # One mask at 0.4 == low commits; at 0.39 nothing; a run entirely below low commits nothing.
    assert positions(rules.hierarchy_mask(conf, cand, threshold, low)) == [[1], [], []]


def test_hierarchy_mask_adjacent_runs_at_block_edges() -> None:
    # Masks at both ends separated by committed positions: two runs, each picks its own best.
    conf = t([[0.5, 0.6, 0.99, 0.99, 0.45, 0.45]])
    cand = b([[T, T, F, F, T, T]])
    got = rules.hierarchy_mask(conf, cand, torch.tensor([0.9]), torch.tensor([0.4]))
    assert positions(got) == [[1, 4]]


def _hierarchy_reference(conf: list[float], cand: list[bool], th: float, low: float) -> list[int]:
    """dInfer's hierarchical rule restated on lists: >= th, plus each masked run's leftmost best."""
    chosen = {i for i, (c, m) in enumerate(zip(conf, cand, strict=True)) if m and c >= th}
    i = 0
    while i < len(conf):
        if not cand[i]:
            i += 1
            continue
        j = i
        while j < len(conf) and cand[j]:
            j += 1
        best = max(range(i, j), key=lambda k: (conf[k], -k))
        if conf[best] >= low:
            chosen.add(best)
        i = j
    return sorted(chosen)


def test_hierarchy_mask_matches_definition_on_random_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    conf = torch.randint(0, 10, (64, 12), generator=gen).float() / 10  # coarse: many ties
    cand = torch.rand((64, 12), generator=gen) < 0.6
    th = torch.randint(5, 10, (64,), generator=gen).float() / 10
    low = torch.randint(0, 5, (64,), generator=gen).float() / 10
    got = positions(rules.hierarchy_mask(conf, cand, th, low))
    for i in range(64):
        row = conf[i].tolist()
        assert got[i] == _hierarchy_reference(row, cand[i].tolist(), th[i].item(), low[i].item()), i


# -- credit -----------------------------------------------------------------------------------------


def test_credit_update_decays_and_adds_only_at_candidates() -> None:
    credit = torch.tensor(
        [
            [[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]],
            [[0.0, 0.0, 0.0], [0.0, 3.0, 0.0]],
        ]
    )
    probs = torch.tensor(
        [
            [[0.16, 0.64, 0.20], [0.81, 0.09, 0.10]],
            [[0.20, 0.30, 0.50], [0.25, 0.25, 0.50]],
        ]
    )
    cand = b([[T, F], [T, T]])
    beta = torch.tensor([0.5, 1.0])
    gamma = torch.tensor([0.5, 1.0])
    got = rules.credit_update(credit, probs, cand, beta, gamma)
    expected = torch.tensor(
        [
            # row 0, beta .5: pos 0 gets 0.64**0.5 = 0.8 at token 1; pos 1 (committed) decays only.
            [[0.5, 1.0 + 0.8, 0.0], [2.0, 0.0, 0.0]],
            # row 1, beta 1, gamma 1: adds the top-1 probability itself at token 2 on both.
            [[0.0, 0.0, 0.5], [0.0, 3.0, 0.5]],
        ]
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_credit_logits_adds_alpha_log1p_credit() -> None:
    logits = torch.tensor([[[1.0, -2.0]], [[0.5, 0.0]]])
    credit = torch.tensor([[[math.e - 1, 0.0]], [[math.e**2 - 1, math.e - 1]]])
    alpha = torch.tensor([0.7, 2.0])
    expected = torch.tensor([[[1.0 + 0.7, -2.0]], [[0.5 + 2.0 * 2, 0.0 + 2.0]]])
    torch.testing.assert_close(rules.credit_logits(logits, credit, alpha), expected, rtol=0, atol=1e-5)


# -- select_commits ---------------------------------------------------------------------------------


def _select(rows: list[dict]) -> list[list[int]]:
    """select_commits over a batch built from per-row dicts (conf, cand, floor, rule, knobs)."""
    mask = select_commits(
        t([r["conf"] for r in rows]),
        b([r["cand"] for r in rows]),
        torch.tensor([r["floor"] for r in rows]),
        [r["rule"] for r in rows],
        knobs(
            torch.tensor([r.get("threshold", 0.9) for r in rows]),
            torch.tensor([r.get("factor", 1.0) for r in rows]),
            torch.tensor([r.get("low", 0.4) for r in rows]),
        ),
    )
    return positions(mask)


CONF = [0.30, 0.95, 0.99, 0.50, 0.45, 0.92, 0.80]
CAND = [T, T, F, T, T, T, T]  # position 2 is committed: runs [0, 1] and [3..6]


def test_select_commits_each_rule_in_one_batch() -> None:
    rows = [
        # schedule: exactly the floor, thresholds ignored: top 2 = 0.95 (1), 0.92 (5).
        {"conf": CONF, "cand": CAND, "floor": 2, "rule": "schedule", "threshold": 0.1},
        # threshold 0.9: floor {1} plus {1, 5}.
        {"conf": CONF, "cand": CAND, "floor": 1, "rule": "threshold", "threshold": 0.9},
        # threshold 0.7 with floor 3: top 3 {1, 5, 6} plus >= 0.7 {1, 5, 6}.
        {"conf": CONF, "cand": CAND, "floor": 3, "rule": "threshold", "threshold": 0.7},
        # factor 1: sorted .95 .92 .8 .5: .8 >= .75 at n=3, .5 < .8 at n=4 -> {1, 5, 6}.
        {"conf": CONF, "cand": CAND, "floor": 1, "rule": "factor", "factor": 1.0},
        # hierarchy: >= 0.9 {1, 5}; run [0,1] best 1; run [3..6] best 5 -> {1, 5}.
        {"conf": CONF, "cand": CAND, "floor": 1, "rule": "hierarchy", "threshold": 0.9, "low": 0.4},
        # hierarchy with threshold 0.96: none; run [0,1] best 1, run [3..6] best 5 -> {1, 5}.
        {"conf": CONF, "cand": CAND, "floor": 1, "rule": "hierarchy", "threshold": 0.96, "low": 0.4},
        # credit commits like threshold: >= 0.45 -> {1, 3, 4, 5, 6}.
        {"conf": CONF, "cand": CAND, "floor": 1, "rule": "credit", "threshold": 0.45},
    ]
    assert _select(rows) == [[1, 5], [1, 5], [1, 5, 6], [1, 5, 6], [1, 5], [1, 5], [1, 3, 4, 5, 6]]


def test_select_commits_floor_always_commits_most_confident() -> None:
    conf = [0.30, 0.50, 0.99, 0.45, 0.35]
    cand = [T, T, F, T, T]
    rows = [
        {"conf": conf, "cand": cand, "floor": 1, "rule": "threshold", "threshold": 0.9},
        {"conf": conf, "cand": cand, "floor": 1, "rule": "factor", "factor": 0.1},
        {"conf": conf, "cand": cand, "floor": 1, "rule": "hierarchy", "threshold": 0.9, "low": 0.6},
        {"conf": conf, "cand": cand, "floor": 1, "rule": "credit", "threshold": 1.0},
        {"conf": conf, "cand": cand, "floor": 1, "rule": "schedule"},
    ]
    # Nothing clears any rule's bar; the floor still commits the best candidate (0.5 at pos 1).
    assert _select(rows) == [[1]] * 5


def test_select_commits_ties_and_single_mask() -> None:
    tied = [0.7, 0.7, 0.7, 0.7]
    rows = [
        {"conf": tied, "cand": [T] * 4, "floor": 1, "rule": "schedule"},
        {"conf": tied, "cand": [F, T, T, T], "floor": 2, "rule": "schedule"},
        {"conf": tied, "cand": [T] * 4, "floor": 1, "rule": "hierarchy", "threshold": 0.9, "low": 0.5},
        # A block with one mask left commits it whatever its confidence and rule.
        {"conf": [0.9, 0.01, 0.9, 0.9], "cand": [F, T, F, F], "floor": 1, "rule": "threshold"},
        {"conf": [0.9, 0.9, 0.9, 0.01], "cand": [F, F, F, T], "floor": 1, "rule": "hierarchy"},
        {"conf": [0.01, 0.9, 0.9, 0.9], "cand": [T, F, F, F], "floor": 1, "rule": "factor"},
    ]
    assert _select(rows) == [[0], [1, 2], [0], [1], [3], [0]]


def test_select_commits_rows_with_different_thresholds() -> None:
    conf = [0.95, 0.85, 0.75, 0.65, 0.55]
    rows = [
        {"conf": conf, "cand": [T] * 5, "floor": 1, "rule": "threshold", "threshold": th}
        for th in (0.99, 0.9, 0.8, 0.6, 0.55)
    ]
    assert _select(rows) == [[0], [0], [0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4]]


def test_select_commits_row_result_independent_of_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    conf = torch.rand((6, 16), generator=gen)
    cand = torch.rand((6, 16), generator=gen) < 0.6
    cand[:, 0] = True
    floor = torch.tensor([1, 2, 1, 1, 3, 1])
    rule = [RULE_NAMES[i] for i in (0, 1, 2, 3, 4, 1)]
    values = (
        torch.tensor([0.9, 0.8, 0.9, 0.7, 0.6, 0.5]),
        torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0, 1.0]),
        torch.tensor([0.4, 0.4, 0.4, 0.3, 0.4, 0.4]),
    )
    batched = select_commits(conf, cand, floor, rule, knobs(*values))
    for i in range(6):
        one = slice(i, i + 1)
        alone = select_commits(conf[one], cand[one], floor[one], rule[one], knobs(*(k[one] for k in values)))
        assert torch.equal(alone[0], batched[i])
        assert not bool((batched[i] & ~cand[i]).any())


# -- Sequence.floor_commits: LLaDA's get_num_transfer_tokens ------------------------------------


def _sequence(
    block_length: int, steps: int, num_blocks: int = 1, rule: str = "schedule", cap: int | None = None
) -> Sequence:
    gen_length = block_length * num_blocks
    params = DecodeParams(
        algorithm="llada",
        cache="none",
        rule=rule,
        gen_length=gen_length,
        block_length=block_length,
        steps=steps * num_blocks,
        max_steps_per_block=cap,
    )
    request = GenerationRequest("r", [5, 6, 7], params, gen_length)
    canvas = torch.tensor([5, 6, 7] + [99] * gen_length)
    return Sequence(request, canvas, mask_id=99, stop_ids=(), generator=torch.Generator())


@pytest.mark.parametrize("num_blocks", [1, 3])
def test_floor_commits_reproduces_llada_split(num_blocks: int) -> None:
    for n in range(1, 41):
        for s in range(1, 49):
            seq = _sequence(n, s, num_blocks)
            left, got = n, []
            for step in range(s):
                seq.step_in_block = step
                k = seq.floor_commits(left)
                got.append(k)
                left -= k
            base, rem = n // s, n % s
            expected = [base + 1] * rem + [base] * (s - rem)
            assert got == expected, (n, s)
            assert left == 0


@pytest.mark.parametrize("rule", ["threshold", "factor", "hierarchy", "credit"])
def test_floor_commits_threshold_rules(rule: str) -> None:
    """Uncapped: one commit (the most confident position) whatever steps says; capped: the split of
    what is left over the cap's remaining steps, so the block ends within the cap."""
    free = _sequence(16, 2, rule=rule)
    for step in range(20):
        free.step_in_block = step
        assert free.floor_commits(16) == 1 and free.floor_commits(0) == 0
    capped = _sequence(16, 16, rule=rule, cap=3)
    got, left = [], 16
    for step in range(3):
        capped.step_in_block = step
        got.append(capped.floor_commits(left))
        left -= got[-1]
    assert got == [6, 5, 5] and left == 0
