"""`--threads`: the default count, the oversubscription warning, and the flag reaching torch."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from dllm_serve.cluster.replicas import with_replica_threads
from dllm_serve.config import EngineConfig, ServerConfig
from dllm_serve.threads import apply_threads, default_threads, usable_cores, warn_if_oversubscribed
from tests.helpers import REPO


def test_usable_cores_is_the_affinity() -> None:
    assert usable_cores() == len(os.sched_getaffinity(0))


def test_default_divides_the_cores_among_processes(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads(1, cores=8) == 8
    assert default_threads(3, cores=8) == 2
    assert default_threads(16, cores=8) == 1  # never below one
    assert default_threads() == usable_cores()
    # A launcher's explicit OMP_NUM_THREADS wins over the arithmetic.
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads(2, cores=8) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert default_threads(2, cores=8) == 4


def test_oversubscription_warns_one_line(caplog) -> None:
    cores = usable_cores()
    with caplog.at_level(logging.WARNING, logger="dllm_serve.threads"):
        assert not warn_if_oversubscribed(1, cores)
        assert caplog.records == []
        assert warn_if_oversubscribed(cores, 2)
    assert len(caplog.records) == 1
    assert f"exceed the {cores} cores" in caplog.records[0].getMessage()


@pytest.mark.parametrize("bad", [0, -2, True, 1.5])
def test_bad_thread_counts_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="--threads must be an integer >= 1"):
        apply_threads(bad)


def test_replicas_on_one_machine_share_the_cores(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = usable_cores()
    local = with_replica_threads(ServerConfig(replicas=2), 2)
    assert local.engine.threads == max(1, cores // 2)
    explicit = with_replica_threads(ServerConfig(engine=EngineConfig(threads=3), replicas=2), 2)
    assert explicit.engine.threads == 3
    # Joining a cluster: replicas may be on other machines; each takes its own default there.
    remote = with_replica_threads(ServerConfig(replicas=2, ray_address="127.0.0.1:6379"), 2)
    assert remote.engine.threads is None


def _generate(*flags: str, env_omp: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO)])
    if env_omp is not None:
        env["OMP_NUM_THREADS"] = env_omp
    cmd = [
        sys.executable,
        "-m",
        "dllm_serve.cli",
        "generate",
        "--stats",
        "--gen-length",
        "8",
        *flags,
        "Copy: a b",
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=True)


def test_the_flag_reaches_torch_in_a_real_process() -> None:
    cores = usable_cores()
    one = _generate("--threads", "1", env_omp="1")
    assert "threads=1" in one.stderr and "exceed" not in one.stderr
    # The default, with no OMP_NUM_THREADS: every usable core, no warning.
    default = _generate(env_omp=None)
    assert f"threads={cores}\n" in default.stderr and "exceed" not in default.stderr
    # More threads than cores: honoured, with one warning line.
    over = _generate("--threads", str(cores + 1), env_omp="1")
    assert f"threads={cores + 1}\n" in over.stderr
    assert sum("exceed the" in line for line in over.stderr.splitlines()) == 1
