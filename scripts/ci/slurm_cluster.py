"""A throwaway one-node SLURM cluster on this machine, for the integration tests and for trying things.

Everything lives under one directory: a private munge key and socket, a generated slurm.conf (this
machine's hostname and the CPUs/memory ``slurmd -C`` reports), state and spool directories, logs and
pid files. The daemons run as root in the foreground as children of this process, so stopping the
cluster stops exactly them and nothing else on the machine. Clients find the cluster through the
``SLURM_CONF`` variable that :meth:`LocalSlurm.env` returns.

Used as a library by ``tests/integration/test_slurm.py``; as a script::

    python scripts/ci/slurm_cluster.py start --dir /tmp/slurm   # prints `export SLURM_CONF=...`
    python scripts/ci/slurm_cluster.py stop --dir /tmp/slurm
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing_programs() -> list[str]:
    """The programs a local cluster needs that are not installed (Debian: slurm-wlm, munge)."""
    return [p for p in (*DAEMONS, "sbatch", "squeue", "scancel", "scontrol") if shutil.which(p) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_resources() -> tuple[int, int]:
    """(CPUs, RealMemory MB) of this machine as slurmd sees it."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    cpus = int(re.search(r"CPUs=(\d+)", out).group(1))
    mem = int(re.search(r"RealMemory=(\d+)", out).group(1))
    return cpus, mem


def render_slurm_conf(root: Path, hostname: str, cpus: int, mem_mb: int) -> str:
    """slurm.conf for one node that is both controller and compute node, daemons as root."""
    ctld_port, slurmd_port = _free_port(), _free_port()
    return "\n".join(
        [
            "ClusterName=dllmtest",
            f"SlurmctldHost={hostname}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={root / 'munge.socket'}",
            f"StateSaveLocation={root / 'ctld'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "MinJobAge=600",
            "KillWait=5",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # Memory is not a consumable here; a --mem request is only checked against the node's size.
            f"NodeName={hostname} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={hostname} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


@dataclass
class LocalSlurm:
    """A running one-node cluster rooted at ``root``; :meth:`stop` ends its three daemons."""

    root: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self) -> dict[str, str]:
        """Variables a client (sbatch, squeue, ...) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60.0) -> LocalSlurm:
        root = self.root
        for sub in ("ctld", "spool"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        key = root / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        cpus, mem = node_resources()
        self.conf.write_text(render_slurm_conf(root, socket.gethostname(), cpus, mem))
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={root / 'munge.socket'}",
                f"--key-file={key}",
                f"--pid-file={root / 'munged.pid'}",
                f"--log-file={root / 'munged.log'}",
                f"--seed-file={root / 'munged.seed'}",
            ],
            env,
        )
        self._wait(lambda: (root / "munge.socket").exists(), timeout, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)], env)
        self._wait(lambda: self._scontrol_ping(env), timeout, "slurmctld to answer")
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)], env)
        self._wait(lambda: self._node_idle(env), timeout, "the node to be idle")
        return self

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.root / f"{name}.stdout", "ab")  # noqa: SIM115 - owned by the child
        self.procs[name] = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}: {self.log_tail(name)}")
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"waited {timeout:.0f}s for {what}: {self.log_tail()}")

    @staticmethod
    def _scontrol_ping(env: dict[str, str]) -> bool:
        r = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True)
        return r.returncode == 0 and "UP" in r.stdout

    @staticmethod
    def _node_idle(env: dict[str, str]) -> bool:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        return r.returncode == 0 and r.stdout.strip().startswith("idle")

    def log_tail(self, name: str | None = None, lines: int = 20) -> str:
        names = [name] if name else list(DAEMONS)
        parts = []
        for n in names:
            for path in (self.root / f"{n}.log", self.root / f"{n}.stdout"):
                if path.exists():
                    tail = path.read_text(errors="replace").splitlines()[-lines:]
                    parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the daemons in reverse order: SIGTERM, then SIGKILL after ``timeout``."""
        for name in reversed(DAEMONS):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _stop_from_pidfiles(root: Path) -> None:
    """Script mode: the daemons were started by another process; end them by their recorded pids."""
    for name in ("slurmd", "slurmctld", "munged"):
        pidfile = root / f"{name}.pid"
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.action == "stop":
        _stop_from_pidfiles(args.dir)
        return 0
    if missing := missing_programs():
        print(f"missing: {' '.join(missing)} (apt-get install slurm-wlm munge)", file=sys.stderr)
        return 1
    cluster = LocalSlurm(args.dir.resolve()).start()
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
