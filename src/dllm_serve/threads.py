"""CPU threads for torch in the process that runs the model (`--threads`).

torch starts one intra-op thread per core it sees, in every process. Two such processes on one
machine (two replicas, a server next to a benchmark) then run twice as many busy threads as there
are cores, and a forward slows down many-fold. So the engine sets the count itself:
``--threads`` when given, else ``OMP_NUM_THREADS`` when the environment sets it (a launcher's
choice), else the cores this process may use divided among the processes that share them.
"""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and SLURM narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(processes: int = 1, cores: int | None = None) -> int:
    """Threads per process when ``processes`` model processes share this machine's cores."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (cores or usable_cores()) // max(1, processes))


def warn_if_oversubscribed(threads: int, processes: int = 1) -> bool:
    """One warning line when threads x processes exceed the usable cores; True if it warned."""
    cores = usable_cores()
    if threads * processes <= cores:
        return False
    log.warning(
        "%d torch threads x %d model processes = %d exceed the %d cores this process may use; "
        "forwards slow down when cores are oversubscribed (lower --threads)",
        threads,
        processes,
        threads * processes,
        cores,
    )
    return True


def apply_threads(threads: int | None) -> int:
    """Set torch's threads in this process (the one that runs the model); returns the count."""
    import torch

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"--threads must be an integer >= 1, got {threads!r}")
    n = threads if threads is not None else default_threads()
    torch.set_num_threads(n)
    # Inter-op threads can be set once, before any inter-op work: a second engine in the same
    # process keeps the first one's count (the model's forwards use intra-op threads only).
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(n)
    warn_if_oversubscribed(n)
    return n
