"""What runs inside a SLURM job: start `dllm-serve serve`, watch it, and keep the server-info file true.

``python -m dllm_serve.cluster.job --info-file F [--ray-address A --total-gpus N] -- SERVE_ARGS``

The info file goes ``starting`` -> ``ready`` (``/health`` answered 200 with every replica ready, polled
with a deadline) and
ends ``stopped`` (clean exit or cancelled) or ``failed`` with the reason: the exit code and the tail
of the server's log. The server's output is passed through to the job log as it comes.

Secrets never travel in argv: the server reads its API key from ``DLLM_SERVE_API_KEY`` in the
environment the job inherited (sbatch --export=ALL), so it shows up in neither the batch script nor
any process's command line.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from dllm_serve.cluster.info import read_info, write_info

LOG_TAIL_LINES = 30


def _flag_value(args: list[str], flag: str) -> str | None:
    """The value of ``flag`` in an argv list (``--flag v`` or ``--flag=v``), or None."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_address() -> str:
    """An address of this node that other nodes (and the login node) can reach."""
    name = socket.gethostname()
    try:
        addr = socket.gethostbyname(name)
    except OSError:
        return name
    if addr.startswith("127."):
        # /etc/hosts maps the name to loopback; ask the routing table for the outward address.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect(("10.255.255.255", 1))
                addr = s.getsockname()[0]
            except OSError:
                pass
    return addr


def serve_argv(args: list[str], *, port: int, ray_address: str | None, total_gpus: int) -> list[str]:
    """The user's serve arguments completed for this job: bind address, port, Ray cluster, replicas."""
    out = list(args)
    if _flag_value(out, "--host") is None:
        out += ["--host", "0.0.0.0"]
    if _flag_value(out, "--port") is None:
        out += ["--port", str(port)]
    if ray_address and _flag_value(out, "--ray-address") is None:
        out += ["--ray-address", ray_address]
    if total_gpus > 1 and _flag_value(out, "--gpus") is None and _flag_value(out, "--replicas") is None:
        out += ["--gpus", str(total_gpus)]
    return out


def wait_for_tcp(address: str, deadline: float, stopping: threading.Event) -> bool:
    """Poll until something listens at ``host:port`` (the Ray head), the deadline passes or we stop."""
    host, port = address.rsplit(":", 1)
    while time.monotonic() < deadline and not stopping.is_set():
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return True
        except OSError:
            stopping.wait(0.5)
    return False


def server_ready(port: int) -> bool:
    """``/health`` answers 200 and, for a replicated server, says every replica is ready.

    Ray Serve's proxy answers 200 as soon as its first replica runs, while the others may still be
    loading: ``ready`` in the info file promises the whole deployment, so it waits for
    ``replicas_ready`` to reach ``replicas``.
    """
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            if r.status != 200:
                return False
            body = json.loads(r.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError):
        return False
    wanted, ready = (body.get("replicas"), body.get("replicas_ready")) if isinstance(body, dict) else (0, 0)
    if isinstance(wanted, int) and isinstance(ready, int):
        return ready >= wanted
    return True


class ServerProcess:
    """The `dllm-serve serve` child; its output is echoed to ours and the last lines kept for reasons."""

    def __init__(self, argv: list[str]):
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        cmd = [sys.executable, "-m", "dllm_serve.cli", "serve", *argv]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1
        )
        self._pump = threading.Thread(target=self._copy_output, daemon=True)
        self._pump.start()

    def _copy_output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            self.tail.append(line.rstrip("\n"))

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self) -> int:
        code = self.proc.wait()
        self._pump.join(timeout=5)
        return code

    def terminate(self, grace: float = 45.0) -> int:
        """SIGTERM (the server drains running requests), SIGKILL after ``grace`` seconds."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.wait()

    def reason(self, code: int, when: str = "") -> str:
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        tail = "\n".join(self.tail)
        return f"server {how}{when}" + (f"; log tail:\n{tail}" if tail else "")


def run_job(args: argparse.Namespace, serve_args: list[str]) -> int:
    info = Path(args.info_file)
    port = int(_flag_value(serve_args, "--port") or free_port())
    host = node_address()
    write_info(
        info,
        status="starting",
        job_id=os.environ.get("SLURM_JOB_ID"),
        node=socket.gethostname(),
        nodes=os.environ.get("SLURM_JOB_NODELIST"),
        host=host,
        port=port,
        base_url=f"http://{host}:{port}/v1",
        health_url=f"http://{host}:{port}/health",
        ray_address=args.ray_address,
        pid=os.getpid(),
        reason=None,
    )
    stopping = threading.Event()

    def on_signal(signum: int, _frame) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    deadline = time.monotonic() + args.ready_timeout
    if args.ray_address and not wait_for_tcp(args.ray_address, deadline, stopping):
        if stopping.is_set():
            write_info(info, status="stopped", reason="job cancelled before the server started")
            return 0
        write_info(info, status="failed", reason=f"Ray head at {args.ray_address} did not come up")
        return 1

    server = ServerProcess(
        serve_argv(serve_args, port=port, ray_address=args.ray_address, total_gpus=args.total_gpus)
    )
    ready = False
    while not stopping.is_set():
        code = server.poll()
        if code is not None:
            break
        if not ready and server_ready(port):
            ready = True
            write_info(info, status="ready")
        if not ready and time.monotonic() > deadline:
            code = server.terminate()
            write_info(
                info,
                status="failed",
                reason=f"not ready within {args.ready_timeout:.0f}s; " + server.reason(code),
            )
            return 1
        stopping.wait(1.0 if not ready else 2.0)

    if stopping.is_set():
        code = server.terminate()
        current = read_info(info) or {}
        if current.get("status") != "stopped":
            write_info(info, status="stopped", reason="job cancelled or out of time")
        return 0
    code = server.wait()
    if code == 0:
        write_info(info, status="stopped", reason="server exited")
        return 0
    write_info(info, status="failed", reason=server.reason(code, "" if ready else " before it was ready"))
    return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dllm_serve.cluster.job", description=__doc__.splitlines()[0])
    p.add_argument("--info-file", required=True)
    p.add_argument("--ray-address", default=None, help="host:port of the job's Ray head")
    p.add_argument("--total-gpus", type=int, default=0, help="GPUs in the allocation (one replica each)")
    p.add_argument("--ready-timeout", type=float, default=3600.0, help="seconds to wait for /health")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, serve_args = argv[:i], argv[i + 1 :]
    args = build_parser().parse_args(argv)
    return run_job(args, serve_args)


if __name__ == "__main__":
    sys.exit(main())
