"""Token choice (decoding/sampling.py) and confidence measures (decoding/confidence.py).

Expected values are worked out by hand (or with ``math`` in float64) in the test itself.
"""

from __future__ import annotations

import math

import torch

from dllm_serve.decoding.confidence import MEASURES, confidence
from dllm_serve.decoding.sampling import gumbel_argmax, top_p_filter

NEG_INF = float("-inf")


def kept(filtered: torch.Tensor) -> list[list[list[int]]]:
    """Token ids left finite, per row and position."""
    return [[pos.isfinite().nonzero().flatten().tolist() for pos in row] for row in filtered]


# -- top_p_filter -----------------------------------------------------------------------------------

# Position 0: token probabilities 0.15, 0.5, 0.05, 0.3 -> descending order 1, 3, 0, 2 with the mass
# before each token 0, 0.5, 0.8, 0.95. Position 1: 0.05, 0.05, 0.6, 0.3 -> order 2, 3, then 0, 1
# (tied; the lower id first) with mass before 0, 0.6, 0.9, 0.95.
PROBS = [[0.15, 0.5, 0.05, 0.3], [0.05, 0.05, 0.6, 0.3]]


def test_top_p_keeps_smallest_nucleus_per_row() -> None:
    top_p = [0.1, 0.7, 0.85, 0.99, 1.0]
    logits = torch.tensor(PROBS).log().expand(5, 2, 4).clone()
    out = top_p_filter(logits, top_p)
    assert kept(out) == [
        [[1], [2]],  # 0.1: only the top token (its own mass 0.5 / 0.6 already exceeds top_p)
        [[1, 3], [2, 3]],  # 0.7: 0.5 < 0.7 keeps token 3; 0.8 >= 0.7 drops token 0. 0.6 < 0.7 keeps 3.
        [[0, 1, 3], [2, 3]],  # 0.85: 0.8 < 0.85 keeps token 0; 0.9 >= 0.85 drops both 0.05s.
        [[0, 1, 2, 3], [0, 1, 2, 3]],  # 0.99: every mass-before is below 0.99
        [[0, 1, 2, 3], [0, 1, 2, 3]],  # 1.0: off
    ]
    # Kept logits are left exactly as they were (no renormalisation).
    finite = out.isfinite()
    assert torch.equal(out[finite], logits[finite])


def test_top_p_top_token_always_kept() -> None:
    logits = torch.tensor([[[0.0, 3.0, 1.0]], [[5.0, 5.0, 0.0]]])
    out = top_p_filter(logits, [1e-6, 1e-6])
    # Row 1 has two top tokens tied: exactly one is kept, the lower id.
    assert kept(out) == [[[1]], [[0]]]


def test_top_p_ties_keep_lower_token_ids() -> None:
    # Eight equal tokens (0.125 each): mass before them 0, .125, .25, .375 -> 0.3 keeps three.
    out = top_p_filter(torch.zeros(1, 1, 8), [0.3])
    assert kept(out) == [[[0, 1, 2]]]
    # 1000 equal tokens (0.001 each): 0.0045 keeps five, always ids 0-4 (an unstable sort kept
    # arbitrary ids such as 657, 658, 659, 660, 672).
    out = top_p_filter(torch.zeros(2, 3, 1000), [0.0045, 0.0045])
    assert kept(out) == [[[0, 1, 2, 3, 4]] * 3] * 2


def test_top_p_one_leaves_row_untouched_next_to_filtered_row() -> None:
    # A tail so small that the float32 mass before it is exactly 1.0 must still survive top_p=1.
    logits = torch.tensor([[[0.0, -100.0, -100.0, -100.0]], [[0.0, -100.0, -100.0, -100.0]]])
    out = top_p_filter(logits, [1.0, 0.5])
    assert torch.equal(out[0], logits[0])
    assert kept(out) == [[[0, 1, 2, 3]], [[0]]]
    assert top_p_filter(logits, [1.0, 1.0]) is logits


def test_top_p_respects_existing_minus_inf() -> None:
    logits = torch.tensor([[[NEG_INF, 0.0, 0.0, NEG_INF]]])
    assert kept(top_p_filter(logits, [0.9])) == [[[1, 2]]]


# -- gumbel_argmax ----------------------------------------------------------------------------------


def _by_hand(logits: list[float], uniforms: list[float], temperature: float) -> int:
    """argmax of exp(l) / (-log u)^T in Python floats (float64)."""
    scores = [
        0.0 if l_ == NEG_INF else math.exp(l_) / (-math.log(u)) ** temperature
        for l_, u in zip(logits, uniforms, strict=True)
    ]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def test_gumbel_argmax_temperature_zero_is_argmax() -> None:
    logits = torch.tensor([[1.0, 1.5, 0.25, NEG_INF], [0.0, -1.0, 2.0, 1.0]])
    noise = torch.tensor([[0.9, 0.05, 0.5, 0.99], [0.5, 0.5, 0.01, 0.5]], dtype=torch.float64)
    assert gumbel_argmax(logits, 0.0, noise).tolist() == [1, 2]


def test_gumbel_argmax_matches_float64_formula() -> None:
    logits = torch.tensor([1.0, 1.5, 0.25, NEG_INF])
    noise = torch.tensor([0.9, 0.05, 0.5, 0.99], dtype=torch.float64)
    # T=1: e/0.1054 = 25.8, e^1.5/2.996 = 1.50, e^0.25/0.693 = 1.85 -> token 0 (not the argmax 1).
    # T=0.1: e/0.7985 = 3.40, e^1.5/1.116 = 4.02, e^0.25/0.964 = 1.33 -> token 1.
    assert gumbel_argmax(logits, 1.0, noise).item() == 0
    assert gumbel_argmax(logits, 0.1, noise).item() == 1
    gen = torch.Generator().manual_seed(0)
    batch_logits = torch.randn((3, 5, 7), generator=gen).round(decimals=2)
    batch_logits[0, 0, 3] = NEG_INF
    batch_noise = torch.rand((3, 5, 7), generator=gen, dtype=torch.float64)
    for temperature in (0.3, 1.0, 2.5):
        got = gumbel_argmax(batch_logits, temperature, batch_noise)
        for i in range(3):
            for j in range(5):
                expected = _by_hand(batch_logits[i, j].tolist(), batch_noise[i, j].tolist(), temperature)
                assert got[i, j].item() == expected, (temperature, i, j)


def test_gumbel_argmax_uses_float64_noise() -> None:
    # Uniforms 1e-12 apart round to the same float32 (a tie, token 0); float64 separates them:
    # the larger u has the smaller -log u, so token 1 wins.
    noise = torch.tensor([0.5, 0.5 + 1e-12], dtype=torch.float64)
    assert gumbel_argmax(torch.zeros(2), 1.0, noise).item() == 1


# -- confidence -------------------------------------------------------------------------------------


def test_confidence_measures_per_row() -> None:
    assert MEASURES == ("low_confidence", "margin", "entropy")
    one = [[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [1.0, 0.0, 0.0]]
    probs = torch.tensor([one, one, one])
    chosen = torch.tensor([[1, 1, 0]] * 3)  # position 0 chose a non-top token (as sampling may)
    got = confidence(probs, chosen, [0, 1, 2])
    expected = torch.tensor(
        [
            [0.25, 0.6, 1.0],  # probability of the chosen token
            [0.5 - 0.25, 0.6 - 0.3, 1.0],  # top1 - top2, whatever was chosen
            [
                0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25),  # -1.5 ln 2
                0.1 * math.log(0.1) + 0.6 * math.log(0.6) + 0.3 * math.log(0.3),
                0.0,  # zero probabilities add nothing (no NaN)
            ],
        ]
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_confidence_row_measure_does_not_leak_across_rows() -> None:
    probs = torch.tensor([[[0.7, 0.2, 0.1]], [[0.7, 0.2, 0.1]]])
    chosen = torch.tensor([[0], [0]])
    assert torch.allclose(confidence(probs, chosen, [0, 0]), torch.tensor([[0.7], [0.7]]))
    torch.testing.assert_close(
        confidence(probs, chosen, [1, 0]), torch.tensor([[0.5], [0.7]]), rtol=0, atol=1e-6
    )
