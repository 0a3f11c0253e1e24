"""Start a `dllm-serve serve` with dummy weights on a free loopback port and wait until it is ready.

Shared by the probe scripts (request_size_probe.py, shutdown_probe.py), which measure a real server
process from outside.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx


def start_dummy_server(serve_args: list[str], timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """The server process and its base URL, once ``/health`` answers 200 (or the timeout passed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "dllm_serve.cli", "serve", "--port", str(port), "--load-format", "dummy"]
    proc = subprocess.Popen([*cmd, *serve_args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    return proc, base
