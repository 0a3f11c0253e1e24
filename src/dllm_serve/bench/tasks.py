"""The synthetic chat task suites the bundled tiny models are trained and evaluated on.

Two suites (docs/tasks.md describes every task and its checker):

- ``standard`` (the default of ``dllm-serve eval``): item-wise maps of a list of single characters
  (copy, shift each letter by one, upper-case, add one to each digit). Each answer token is a
  function of one prompt token a fixed distance before it, an alignment a 4-layer model learns in
  minutes on a CPU, so the model is certain of the whole answer at once. One answer is right: the
  checker is an exact match. Its held-out prompts and seed are those of every earlier figure.
- ``dependent``: answers whose tokens constrain each other, checked by a rule. ``same_case``: copy
  a list or upper-case it, all letters alike. Trained on both answers equally, the model's best guess
  at every open answer position is its letter in either case with probability about 1/2, so
  committing several open positions in one forward mixes the cases: the price of parallel decoding
  that the ``standard`` suite never charges. Decoded one token per step, the first letter decides.

Items are separated by single spaces, which the bundled BPE tokenizer turns into one token each.
Answers have a fixed length per task, so each ends at a known place. Training and held-out examples
come from disjoint seeds, and ``heldout_examples`` can exclude any prompts given to it.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
DIGITS = string.digits


@dataclass(frozen=True)
class Example:
    """One chat task: ``answer`` is one right answer; ``given`` the prompt's list (dependent tasks)."""

    task: str
    prompt: str
    answer: str
    given: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Task:
    suite: str
    make: Callable[[random.Random], Example]
    check: Callable[[Example, list[str]], bool]


# -- standard: item-wise maps, one right answer ---------------------------------------------------


def _map_task(name: str, instruction: str, alphabet: str, length: int, fn: Callable[[str], str]):
    def make(rng: random.Random) -> Example:
        items = [rng.choice(alphabet) for _ in range(length)]
        return Example(name, f"{instruction} {' '.join(items)}", " ".join(fn(c) for c in items))

    return make


def _shift_letter(c: str) -> str:
    return LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)]


def _add_one(c: str) -> str:
    return DIGITS[(DIGITS.index(c) + 1) % len(DIGITS)]


def _exact(example: Example, items: list[str]) -> bool:
    return " ".join(items) == example.answer


# -- dependent: many right answers, tokens constrain each other -----------------------------------

# The length of `copy`, whose instruction this one extends: a fixed offset the model already knows.
SAME_CASE_LENGTH = 16


def _make_same_case(rng: random.Random) -> Example:
    items = tuple(rng.choice(LETTERS) for _ in range(SAME_CASE_LENGTH))
    answer = [c.upper() for c in items] if rng.random() < 0.5 else list(items)
    return Example("same_case", f"Copy/Upper-case the list: {' '.join(items)}", " ".join(answer), items)


def _same_case(example: Example, items: list[str]) -> bool:
    """The list copied, or the list upper-cased: one case for all items, never a mix."""
    given = list(example.given)
    return items in (given, [c.upper() for c in given])


_TASKS: dict[str, _Task] = {
    "copy": _Task("standard", _map_task("copy", "Copy the list:", LETTERS, 16, lambda c: c), _exact),
    "shift": _Task(
        "standard",
        _map_task("shift", "Replace each letter by the next one:", LETTERS, 12, _shift_letter),
        _exact,
    ),
    "upper": _Task("standard", _map_task("upper", "Upper-case the list:", LETTERS, 14, str.upper), _exact),
    "increment": _Task(
        "standard", _map_task("increment", "Add one to each digit:", DIGITS, 20, _add_one), _exact
    ),
    "same_case": _Task("dependent", _make_same_case, _same_case),
}
SUITES: dict[str, tuple[str, ...]] = {
    suite: tuple(name for name, t in _TASKS.items() if t.suite == suite)
    for suite in ("standard", "dependent")
}
DEFAULT_SUITE = "standard"
TASKS = SUITES[DEFAULT_SUITE]
ALL_TASKS = tuple(_TASKS)

TRAIN_SEED = 1234
HELDOUT_SEED = 987_654_321  # the standard suite's, unchanged, so earlier figures keep their meaning
HELDOUT_SEEDS = {"standard": HELDOUT_SEED, "dependent": 55_555_333}


def suite_tasks(suite: str) -> tuple[str, ...]:
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    return SUITES[suite]


def make_example(rng: random.Random, task: str | None = None) -> Example:
    """Draw one example; ``task`` None picks a task of the standard suite uniformly."""
    task = task or rng.choice(TASKS)
    if task not in _TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(ALL_TASKS)}")
    return _TASKS[task].make(rng)


def training_stream(seed: int = TRAIN_SEED, dependent_share: float = 1 / 3) -> Iterator[Example]:
    """An endless, deterministic stream of training examples: a ``dependent`` task with probability
    ``dependent_share``, else a ``standard`` one (tasks uniform within a suite)."""
    rng = random.Random(seed)
    while True:
        suite = "dependent" if rng.random() < dependent_share else "standard"
        yield make_example(rng, rng.choice(SUITES[suite]))


def heldout_examples(
    n: int, seed: int | None = None, exclude: set[str] | None = None, suite: str = DEFAULT_SUITE
) -> list[Example]:
    """``n`` held-out examples of ``suite``, round-robin over its tasks, none of whose prompts are in
    ``exclude``; ``seed`` None is the suite's own held-out seed."""
    tasks = suite_tasks(suite)
    rng = random.Random(HELDOUT_SEEDS[suite] if seed is None else seed)
    out: list[Example] = []
    seen: set[str] = set(exclude or ())
    while len(out) < n:
        ex = make_example(rng, tasks[len(out) % len(tasks)])
        if ex.prompt in seen:
            continue
        seen.add(ex.prompt)
        out.append(ex)
    return out


def is_correct(example: Example, completion: str) -> bool:
    """The task's rule on the completion's space-separated items, after stripping surrounding white
    space (standard tasks: exact match; dependent tasks: see their checkers)."""
    return _TASKS[example.task].check(example, completion.strip().split(" "))
