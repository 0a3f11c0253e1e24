"""The synthetic chat task set the bundled tiny models are trained and evaluated on.

Every task maps a list of single characters item by item (copy, shift each letter by one, upper-case,
add one to each digit), so each answer token sits a fixed distance after its source token in the
prompt: an alignment a 4-layer model learns in minutes on a CPU, where variable-offset tasks
(reverse, sort) need far longer training. List lengths differ per task, so answers are 12 to 20
tokens and end at different places, spanning several 8- or 16-token blocks. Items are separated by
spaces, which the bundled BPE tokenizer turns into one token each. Training and held-out examples
come from disjoint seeds, and ``heldout_examples`` can exclude any prompts given to it.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
DIGITS = string.digits


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class _Task:
    instruction: str
    alphabet: str
    length: int
    transform: Callable[[str], str]


def _shift_letter(c: str) -> str:
    return LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)]


def _add_one(c: str) -> str:
    return DIGITS[(DIGITS.index(c) + 1) % len(DIGITS)]


_TASKS = {
    "copy": _Task("Copy the list:", LETTERS, 16, lambda c: c),
    "shift": _Task("Replace each letter by the next one:", LETTERS, 12, _shift_letter),
    "upper": _Task("Upper-case the list:", LETTERS, 14, str.upper),
    "increment": _Task("Add one to each digit:", DIGITS, 20, _add_one),
}
TASKS = tuple(_TASKS)

TRAIN_SEED = 1234
HELDOUT_SEED = 987_654_321


def make_example(rng: random.Random, task: str | None = None) -> Example:
    """Draw one example; ``task`` None picks a task uniformly."""
    task = task or rng.choice(TASKS)
    if task not in _TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    spec = _TASKS[task]
    items = [rng.choice(spec.alphabet) for _ in range(spec.length)]
    answer = " ".join(spec.transform(c) for c in items)
    return Example(task, f"{spec.instruction} {' '.join(items)}", answer)


def training_stream(seed: int = TRAIN_SEED):
    """An endless, deterministic stream of training examples."""
    rng = random.Random(seed)
    while True:
        yield make_example(rng)


def heldout_examples(n: int, seed: int = HELDOUT_SEED, exclude: set[str] | None = None) -> list[Example]:
    """``n`` held-out examples, round-robin over tasks, none of whose prompts are in ``exclude``."""
    rng = random.Random(seed)
    out: list[Example] = []
    seen: set[str] = set(exclude or ())
    while len(out) < n:
        ex = make_example(rng, TASKS[len(out) % len(TASKS)])
        if ex.prompt in seen:
            continue
        seen.add(ex.prompt)
        out.append(ex)
    return out


def is_correct(example: Example, completion: str) -> bool:
    """Exact match after stripping surrounding white space."""
    return completion.strip() == example.answer
