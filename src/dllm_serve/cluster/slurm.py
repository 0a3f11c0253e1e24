"""SLURM jobs that serve a model: submit, status, connect, stop.

The job itself (``dllm_serve.cluster.job``) keeps a JSON server-info file in the output directory
up to date; these functions combine that file with what the scheduler says (squeue, then
scontrol, then sacct) so a job that died before it could write, or was killed by the scheduler,
still reads as failed or stopped.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dllm_serve.cluster.info import FINAL_STATUSES, create_pending, info_path, now_iso, read_info, write_info
from dllm_serve.cluster.sbatch import JobSpec, render_sbatch

JOBS_DIR_ENV = "DLLM_SERVE_JOBS_DIR"
SECRET_FLAGS = ("--api-key",)

# Scheduler states and the server status they imply once the job has left the running states.
_ENDED_FAILED = {"FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
_ENDED_STOPPED = {"CANCELLED", "COMPLETED", "TIMEOUT"}


class SlurmError(RuntimeError):
    """A SLURM command failed or a job cannot be found; the message says which and why."""


def default_output_dir() -> str:
    return os.environ.get(JOBS_DIR_ENV) or str(Path.home() / ".dllm-serve" / "jobs")


def check_no_secrets(serve_args: list[str]) -> None:
    """Refuse serve arguments that would put a secret into the batch script or a command line."""
    for a in serve_args:
        if a.split("=", 1)[0] in SECRET_FLAGS:
            raise SlurmError(
                "do not pass --api-key to a job: export DLLM_SERVE_API_KEY in the submitting shell; "
                "the job inherits it (sbatch --export=ALL) and it never appears in the script or argv"
            )


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"{argv[0]} not found: run this on a SLURM login node")
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SlurmError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass
class Submitted:
    job_id: str
    script_path: Path
    info_path: Path
    log_path: Path


def submit(spec: JobSpec) -> Submitted:
    """Render the script into the output directory, sbatch it, write the ``pending`` info file."""
    check_no_secrets(spec.serve_args)
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    script = out / f"{spec.job_name}-{stamp}-{os.getpid()}.sbatch"
    script.write_text(render_sbatch(spec))
    proc = _run(["sbatch", "--parsable", "--export=ALL", str(script)])
    job_id = proc.stdout.strip().split(";")[0]
    info = info_path(out, job_id)
    create_pending(
        info,
        job_id=job_id,
        job_name=spec.job_name,
        script=str(script),
        log=str(out / f"{spec.job_name}-{job_id}.log"),
        submitted_at=now_iso(),
    )
    return Submitted(job_id, script, info, out / f"{spec.job_name}-{job_id}.log")


def scheduler_state(job_id: str) -> tuple[str | None, str | None]:
    """(state, reason-or-None) from squeue, else scontrol, else sacct; (None, None) if unknown."""
    q = _run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"], check=False)
    if q.returncode == 0 and q.stdout.strip():
        state, _, reason = q.stdout.strip().splitlines()[0].partition("|")
        return state, (reason if reason not in ("", "None") else None)
    c = _run(["scontrol", "show", "job", "-o", job_id], check=False)
    if c.returncode == 0 and "JobState=" in c.stdout:
        fields = dict(kv.split("=", 1) for kv in c.stdout.split() if "=" in kv)
        reason = fields.get("Reason")
        return fields["JobState"], (reason if reason not in (None, "None") else None)
    if shutil.which("sacct"):
        a = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], check=False)
        if a.returncode == 0 and a.stdout.strip():
            return a.stdout.strip().splitlines()[0].split()[0], None
    return None, None


def find_info(job_id: str, output_dir: str | None = None) -> Path:
    """The job's info file: in ``output_dir`` (default jobs dir), else next to its SLURM log."""
    candidates = [info_path(output_dir or default_output_dir(), job_id)]
    if shutil.which("scontrol"):
        c = _run(["scontrol", "show", "job", "-o", job_id], check=False)
        for kv in c.stdout.split():
            if kv.startswith("StdOut="):
                candidates.append(info_path(Path(kv.split("=", 1)[1]).parent, job_id))
    for path in candidates:
        if path.exists():
            return path
    return candidates[0]


def job_status(job_id: str, output_dir: str | None = None) -> dict[str, Any]:
    """The info file's document plus ``scheduler_state``; a job the scheduler has ended but whose file
    still says pending/starting/ready is reported (and recorded) as failed or stopped."""
    path = find_info(job_id, output_dir)
    doc = read_info(path) or {"job_id": job_id, "status": "pending"}
    state, sched_reason = scheduler_state(job_id)
    doc["scheduler_state"] = state
    doc["scheduler_reason"] = sched_reason
    doc["info_file"] = str(path)
    if doc.get("status") in FINAL_STATUSES or state is None:
        return doc
    base = state.split()[0].rstrip("+")
    if base in _ENDED_FAILED or (base == "COMPLETED" and doc.get("status") != "ready"):
        reason = f"job ended ({state}) before the server reported; see {doc.get('log', 'the job log')}"
        doc.update(write_info(path, status="failed", reason=reason) if path.parent.exists() else {})
        doc.update(status="failed", reason=reason)
    elif base in _ENDED_STOPPED:
        doc.update(write_info(path, status="stopped", reason=f"job {state}") if path.parent.exists() else {})
        doc.update(status="stopped")
    return doc


def stop(job_id: str, output_dir: str | None = None) -> dict[str, Any]:
    """scancel the job and mark its info file stopped."""
    _run(["scancel", job_id])
    path = find_info(job_id, output_dir)
    return write_info(path, status="stopped", reason="stopped by dllm-serve slurm stop", job_id=job_id)


def wait_ready(job_id: str, output_dir: str | None, timeout: float, poll: float = 2.0) -> dict[str, Any]:
    """Poll the job's status until ready; raise SlurmError on failed/stopped or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        doc = job_status(job_id, output_dir)
        if doc.get("status") == "ready":
            return doc
        if doc.get("status") in FINAL_STATUSES:
            raise SlurmError(f"job {job_id} is {doc['status']}: {doc.get('reason')}")
        if time.monotonic() > deadline:
            raise SlurmError(f"job {job_id} not ready after {timeout:.0f}s (status {doc.get('status')})")
        time.sleep(poll)


def tunnel_command(doc: dict[str, Any], login_node: str | None, local_port: int | None = None) -> str:
    """The ssh port-forward that makes the job's server reachable at localhost on a laptop."""
    login = login_node or socket.getfqdn()
    lport = local_port or int(doc["port"])
    return f"ssh -N -L {lport}:{doc['node']}:{doc['port']} {shlex.quote(login)}"


def check_health(doc: dict[str, Any], timeout: float = 5.0) -> bool:
    """Whether the server answers /health directly from here (true on the login node of most sites)."""
    url = doc.get("health_url") or f"http://{doc['host']}:{doc['port']}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def python_for_job(container_image: str | None, override: str | None) -> str:
    """The interpreter the job runs: this one (shared filesystem), or python3 inside a container."""
    if override:
        return override
    return "python3" if container_image else sys.executable
