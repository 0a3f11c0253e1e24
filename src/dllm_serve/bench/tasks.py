"""The synthetic chat task set the bundled tiny models are trained and evaluated on.

Every task has one checkable answer of 10 to 52 tokens, so answers span several 16- or 32-token
blocks. Items are single characters separated by spaces, which the bundled BPE tokenizer turns
into one token each. Letter lists never repeat a letter: each item then has one unambiguous
successor, which a tiny model can learn to follow (copy, reverse, double); digit lists repeat.
Training and held-out examples come from disjoint seeds, and ``heldout_examples`` can exclude
any prompts given to it.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

TASKS = ("copy", "reverse", "sort", "double")
LETTERS = string.ascii_lowercase
DIGITS = string.digits

TRAIN_SEED = 1234
HELDOUT_SEED = 987_654_321


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


def _letters(rng: random.Random, low: int, high: int) -> list[str]:
    """Distinct letters in random order."""
    return rng.sample(LETTERS, rng.randint(low, high))


def _digits(rng: random.Random, low: int, high: int) -> list[str]:
    return [rng.choice(DIGITS) for _ in range(rng.randint(low, high))]


def make_example(rng: random.Random, task: str | None = None) -> Example:
    """Draw one example; ``task`` None picks a task uniformly."""
    task = task or rng.choice(TASKS)
    if task == "copy":
        items = _letters(rng, 10, 26)
        return Example(task, "Copy the list: " + " ".join(items), " ".join(items))
    if task == "reverse":
        items = _letters(rng, 10, 26)
        return Example(task, "Reverse the list: " + " ".join(items), " ".join(reversed(items)))
    if task == "sort":
        items = _digits(rng, 10, 30)
        return Example(task, "Sort the digits: " + " ".join(items), " ".join(sorted(items)))
    if task == "double":
        items = _letters(rng, 5, 26)
        return Example(
            task, "Repeat each letter twice: " + " ".join(items), " ".join(c for c in items for _ in (0, 1))
        )
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


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
