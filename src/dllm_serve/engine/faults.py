"""Named fault-injection points, switched on by ``DLLM_SERVE_FAULTS`` (a comma-separated list).

They let tests and operators' drills exercise failure handling on a real server without editing
code: ``DLLM_SERVE_FAULTS=engine-step dllm-serve serve`` makes every engine iteration that has
work raise outside any one request's isolation, as a bug in the loop would (docs/memory.md).
"""

from __future__ import annotations

import os

ENV = "DLLM_SERVE_FAULTS"
POINTS = ("engine-step",)


class InjectedFault(RuntimeError):
    pass


def enabled() -> frozenset[str]:
    """The fault points switched on in this process's environment (unknown names are an error)."""
    names = frozenset(n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip())
    unknown = names - set(POINTS)
    if unknown:
        raise ValueError(f"{ENV}: unknown fault point(s) {sorted(unknown)}; known: {list(POINTS)}")
    return names


def hit(active: frozenset[str], point: str) -> None:
    """Raise InjectedFault if ``point`` is switched on."""
    if point in active:
        raise InjectedFault(f"injected fault at {point} ({ENV})")
