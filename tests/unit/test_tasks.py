"""The synthetic task suites: every checker accepts every right answer and refuses the wrong ones
that parallel decoding produces (a repeated, missing or foreign letter, a wrong count); the standard
suite's held-out prompts are those of every earlier figure."""

from __future__ import annotations

import hashlib

import pytest

from dllm_serve.bench.tasks import SUITES, Example, heldout_examples, is_correct, training_stream


def test_standard_heldout_prompts_are_unchanged():
    """The held-out set behind every committed standard-suite figure (first 200, seed 987654321)."""
    examples = heldout_examples(200)
    assert [e.task for e in examples[:4]] == ["copy", "shift", "upper", "increment"]
    assert examples[0].prompt == "Copy the list: f n m m o d w f d g q k y m f k"
    digest = hashlib.sha256("\n".join(e.prompt + "|" + e.answer for e in examples).encode()).hexdigest()
    assert digest[:16] == "76fa9e3f98ada565"  # computed with the task module before the dependent suite


def test_standard_checker_is_exact_match():
    ex = heldout_examples(2)[1]  # shift
    assert is_correct(ex, ex.answer) and is_correct(ex, f"  {ex.answer}\n")
    items = ex.answer.split(" ")
    assert not is_correct(ex, " ".join(items[::-1]))
    assert not is_correct(ex, ex.answer + " a")
    assert not is_correct(ex, ex.answer.replace(" ", "  ", 1))


SAME_CASE = Example("same_case", "Copy/Upper-case the list: a b a", "A B A", ("a", "b", "a"))


def test_same_case_accepts_the_copy_or_the_upper_case_and_no_mix():
    assert is_correct(SAME_CASE, "a b a") and is_correct(SAME_CASE, "A B A")
    for wrong in ("A b a", "a B A", "A B a", "a b", "A B A A", "b a a", "B A A", "a b c", "aba", ""):
        assert not is_correct(SAME_CASE, wrong), wrong


def test_dependent_heldout_set_is_round_robin_and_its_answers_pass():
    examples = heldout_examples(30, suite="dependent")
    assert SUITES["dependent"] == ("same_case",)
    assert len({e.prompt for e in examples}) == 30
    assert all(is_correct(e, e.answer) for e in examples)
    # The other right answer passes too; what parallel decoding commits when every open position
    # takes its own arg-max (a mix of cases) does not.
    for e in examples:
        given = list(e.given)
        upper = [c.upper() for c in given]
        other = upper if e.answer == " ".join(given) else given
        mixed = [c.upper() if i % 2 else c for i, c in enumerate(given)]
        assert is_correct(e, " ".join(other)) and not is_correct(e, " ".join(mixed))
    assert {e.answer == " ".join(e.given) for e in examples} == {True, False}  # both cases held out


def test_training_stream_draws_both_suites_and_other_seeds_than_heldout():
    stream = training_stream()
    drawn = [next(stream) for _ in range(700)]
    assert {e.task for e in drawn} == set(SUITES["standard"]) | set(SUITES["dependent"])
    heldout = {e.prompt for e in heldout_examples(200)}
    assert not heldout & {e.prompt for e in drawn if e.task in SUITES["standard"]}


def test_unknown_suite_is_refused():
    with pytest.raises(ValueError, match="unknown suite"):
        heldout_examples(3, suite="hard")
