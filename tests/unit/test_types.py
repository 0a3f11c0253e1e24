"""The type check runs with the suite: mypy over src/dllm_serve, configured in pyproject.toml.

A seam typed wrong (a handler passing the wrong engine type, a route reading a field a request
schema lacks) fails here with mypy's own report. The cache lives in the temporary directory, so a
second run on the same machine takes seconds; a cold run takes about half a minute on 2 cores.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_mypy_passes_on_the_package() -> None:
    # One cache per checkout: worktrees of this repository do not overwrite each other's.
    checkout = hashlib.sha1(str(ROOT).encode()).hexdigest()[:12]
    cache = Path(tempfile.gettempdir()) / f"dllm-serve-mypy-cache-{checkout}"
    config = str(ROOT / "pyproject.toml")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", config, "--cache-dir", str(cache)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"mypy found type errors:\n{proc.stdout}{proc.stderr}"
