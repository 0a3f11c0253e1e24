"""`dllm-serve generate --show`: live ANSI redraws on a terminal (a pseudo-terminal here), plain text
otherwise, and the same final text either way."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from dllm_serve.engine.denoise import DenoiseStep
from dllm_serve.models.tokenizer import ChatTokenizer
from dllm_serve.terminal_view import TerminalCanvas
from tests.helpers import TINY_LLADA

# llada at one token per step: 128 forwards, so the frame-rate cap still leaves several redraws.
ARGS = ["generate", "--show", "--algorithm", "llada", "--max-tokens", "128", "--block-length", "32"]
ARGS += ["Copy: a b c d"]
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run_on_pty(rows: int = 30, cols: int = 100) -> str:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dllm_serve.cli", *ARGS],
        stdout=slave,
        stderr=subprocess.DEVNULL,
        env=_env(),
    )
    os.close(slave)
    out = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        out += data
    os.close(master)
    assert proc.wait(120) == 0
    return out.decode()


def test_show_redraws_in_place_on_a_terminal_and_prints_plain_text_otherwise():
    plain = subprocess.run(
        [sys.executable, "-m", "dllm_serve.cli", *ARGS],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=True,
    ).stdout
    assert "\x1b[" not in plain  # piped: no escapes at all
    live = _run_on_pty()
    assert len(re.findall(r"\x1b\[\d+F\x1b\[J", live)) >= 2  # redrawn in place, several times
    assert re.search(r"\x1b\[38;5;\d+", live)  # committed tokens coloured by step
    frames = [f for f in live.split("step ") if "committed" in f]
    assert len(frames) >= 2
    last_line = live.replace("\r\n", "\n").rstrip("\n").split("\n")[-1]
    assert last_line == plain.rstrip("\n")  # the same text as without --show


def test_canvas_lines_fit_the_width_and_mark_state():
    view = TerminalCanvas(ChatTokenizer(TINY_LLADA), out=open(os.devnull, "w"))  # noqa: SIM115
    tok = view._hf.encode("a", add_special_tokens=False)[0]
    assert view.piece(tok) == "a"
    view.update(DenoiseStep(1, 0, 0, 8, 40, True, [(0, tok, 0.9)], [(1, tok, 0.4)]))
    view.update(DenoiseStep(2, 0, 0, 8, 40, False, [(1, tok, 0.95)], [(2, tok, 0.3)]))
    lines = view.render(12)
    assert lines[0].startswith("step 2  block 0  2/40 committed")
    body = [ANSI.sub("", line) for line in lines[1:]]
    assert all(len(line) <= 12 for line in body)
    assert "".join(body) == "aaa" + "·" * 37  # two committed, one guess, then masks
    assert "\x1b[2;4ma" in lines[1]  # the guess: dim, in the (underlined) active block
