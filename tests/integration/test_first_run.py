"""First-run mistakes through the real `dllm-serve` CLI: one line, a non-zero exit, before loading.

Each case runs the console entry point in a subprocess as a new user would and checks the exit code,
that stderr holds exactly one `error:` line (no traceback) saying what is wrong, and that nothing
claims to be serving.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_LLADA

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without GPUs")


def cli(*args: str, timeout: float = 120, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "dllm_serve.cli", *args],
        env={**ENV, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return res, time.monotonic() - start


def one_error(res: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a failed command (no traceback, nothing served)."""
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "Traceback" not in out, out
    assert not re.search(r"serving \S+ on http", out), out
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, out
    return errors[0]


@no_gpu
@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--gpus", "2"], "--gpus 2 needs 2 GPU(s), but 0 are visible"),
        (["--gpus", "1"], "--gpus 1 needs 1 GPU(s), but 0 are visible"),
        (["--device", "cuda"], "--device cuda is not available"),
        (["--device", "cuda:1"], "--device cuda:1 is not available"),
    ],
)
def test_gpu_flags_without_gpus_fail_fast_saying_what_is_visible(args: list[str], said: str) -> None:
    res, took = cli("serve", "--port", "0", *args)
    assert said in one_error(res)
    assert took < 10, f"took {took:.1f}s"


def test_wrong_model_path_is_one_line_before_anything_loads(tmp_path: Path) -> None:
    res, _ = cli("serve", "--model-path", str(tmp_path / "no-such-model"), "--port", "0")
    assert f"model path {tmp_path / 'no-such-model'} does not exist" in one_error(res)
    res, _ = cli("serve", "--model-path", str(tmp_path), "--port", "0")
    assert "has no config.json" in one_error(res)
    # A hub id that is not in the local cache: the hint names the current CLI (`hf download`).
    res, _ = cli("serve", "--model-path", "some-org/not-downloaded", "--port", "0")
    line = one_error(res)
    assert "hf download some-org/not-downloaded" in line and "huggingface-cli" not in line


def test_damaged_weights_end_the_server_with_one_line(tmp_path: Path) -> None:
    """Found only while loading: the server exits non-zero with one line naming the file."""
    model = tmp_path / "model"
    shutil.copytree(TINY_LLADA, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    res, _ = cli("serve", "--model-path", str(model), "--port", "0")
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in out, out
    assert not re.search(r"serving \S+ on http", out), out
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"cannot read {weights}" in errors[0], out


def test_port_in_use_is_found_before_the_model_loads() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for extra in ([], ["--replicas", "2"]):  # the Ray path checks before starting Ray
            res, took = cli("serve", "--port", str(port), *extra)
            assert f"cannot listen on 127.0.0.1:{port}" in one_error(res), extra
            assert "loading" not in res.stderr, res.stderr
            assert took < 30, f"took {took:.1f}s"


def test_generate_with_an_empty_prompt_is_an_error() -> None:
    for prompt in ("", "   "):
        res, _ = cli("generate", prompt)
        assert "the prompt is empty" in one_error(res)
        assert res.stdout == ""


def test_serve_help_shows_defaults_and_the_algorithm_help_names_a_real_command() -> None:
    res, _ = cli("serve", "--help", COLUMNS="400")  # no wrapping inside the command
    assert res.returncode == 0
    text = " ".join(res.stdout.split())  # argparse wraps lines
    for default in ("(default: 8000)", "(default: 127.0.0.1)", "(default: 32)", "(default: 1024)"):
        assert default in text, default
    command = re.search(r"`(dllm-serve models[^`]*)`", text)
    assert command, text
    args = command.group(1).split()[1:]
    args = [str(TINY_LLADA) if a == "M" else a for a in args]
    models, _ = cli(*args)
    assert models.returncode == 0, models.stderr
    assert '"algorithms"' in models.stdout and "dual_cache" in models.stdout


def _eval_stderr(tty: bool) -> str:
    cmd = [sys.executable, "-m", "dllm_serve.cli", "eval", "--limit", "3", "--gen-length", "16", "--json"]
    if not tty:
        res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stderr
        return res.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a real terminal's size
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(30) == 0
    return b"".join(chunks).decode(errors="replace")


def test_eval_shows_progress_on_a_terminal_only() -> None:
    assert re.search(r"eval: 100%.*3/3", _eval_stderr(tty=True))
    assert "3/3" not in _eval_stderr(tty=False)
