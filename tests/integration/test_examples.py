"""Every script in examples/ runs against a real server on the bundled tiny-llada, as a user runs it.

The examples find the server through DLLM_SERVE_URL / DLLM_SERVE_API_KEY, so the tests set those and
run the scripts unchanged in subprocesses; each test checks the answers the script prints, not only
its exit code. The SLURM workflow runs against the real SLURM daemons in tests/integration/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from tests.helpers import REPO, TINY_LLADA
from tests.integration.conftest import free_port

EXAMPLES = REPO / "examples"
API_KEY = "sk-examples-test-7d2e"


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory("--max-batch-size", "16", env={"DLLM_SERVE_API_KEY": API_KEY})


def example_env(server=None, **extra: str) -> dict[str, str]:
    """The environment a user would have: the venv's programs first on PATH, the server's address."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra}
    if server is not None:
        env |= {"DLLM_SERVE_URL": server.v1, "DLLM_SERVE_API_KEY": API_KEY}
    return env


def run_example(cmd: list[str], env: dict[str, str], timeout: float = 180) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_chat_example(server):
    out = run_example([sys.executable, str(EXAMPLES / "chat.py")], example_env(server))
    assert "reply:    d i f f u s i o n s e r v e r s" in out
    assert "streamed: d i f f u s i o n s e r v e r s" in out
    lines = {line.split(":")[0].strip(): line for line in out.splitlines()}
    for algorithm in ("llada", "dual_cache"):
        assert "'d i f f u s i o n s e r v e r s'" in lines[algorithm], out
    forwards = {a: int(lines[a].split("forwards=")[1].split()[0]) for a in ("llada", "dual_cache")}
    assert forwards["dual_cache"] < forwards["llada"], out


def test_async_client_example(server):
    out = run_example([sys.executable, str(EXAMPLES / "async_client.py")], example_env(server))
    assert out.count("-> A B C D E F G H I J K L M N O P") == 0  # copy keeps lower case
    assert out.count("-> a b c d e f g h i j k l m n o p") == 4
    assert out.count("-> Q W E R T Y U I O P A S D F") == 4
    assert out.count("-> 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1") == 4
    assert "16 requests in" in out


def test_batch_eval_example(server, tmp_path):
    results = tmp_path / "results.jsonl"
    cmd = [sys.executable, str(EXAMPLES / "batch_eval.py"), str(EXAMPLES / "data" / "tasks.jsonl")]
    out = run_example([*cmd, "--output", str(results), "--concurrency", "6", "--algorithm", "dual_cache"],
                      example_env(server))  # fmt: skip
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == 24 and all({"completion", "correct", "diffusion"} <= set(r) for r in rows)
    accuracy = 100.0 * sum(r["correct"] for r in rows) / len(rows)
    assert accuracy >= 90.0, rows
    assert f"accuracy {accuracy:.1f} % on 24 prompts" in out


def test_curl_example(server):
    out = run_example(["bash", str(EXAMPLES / "curl.sh")], example_env(server))
    assert "model: tiny-llada" in out
    reply = json.loads(out.splitlines()[1])
    assert reply["choices"][0]["message"]["content"] == "C U R L I S H E R E O K A Y"
    assert reply["diffusion"]["algorithm"] == "dinfer_blockwise"
    events = [line[len("data: ") :] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == "s t r e a m e d t o k e n s o k"


def test_langchain_example(server):
    out = run_example([sys.executable, str(EXAMPLES / "langchain_chat.py")], example_env(server))
    assert "invoke: m b o h d i b j o b c d" in out
    assert "stream: c h a i n s o f t o k e n s o k" in out


def test_serve_dcp_example(tmp_path):
    """A NeMo-RL-style DCP step holding the bundled weights serves the bundled model's answers."""
    weights = tmp_path / "step_1" / "policy" / "weights"
    state = {"model": load_file(str(TINY_LLADA / "model.safetensors"))}  # NeMo-RL's `model` entry
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(weights)), no_dist=True)
    del state
    env = example_env(
        DCP_PATH=str(tmp_path / "step_1"),
        BASE_MODEL=str(TINY_LLADA),
        PORT=str(free_port()),
        DCP_CACHE_DIR=str(tmp_path / "cache"),
        SERVE_ARGS="--device cpu --max-batch-size 2",
    )
    out = run_example(["bash", str(EXAMPLES / "serve_dcp.sh")], env, timeout=300)
    reply = json.loads(out.strip().splitlines()[-1])
    assert reply["choices"][0]["message"]["content"] == "c h e c k p o i n t s e r v e d"
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "cache").rglob("*")), "converted once, cached"


def lm_eval_score(out: str, task: str, metric: str) -> float:
    """The value in lm-eval's printed results table for ``task``'s ``metric``."""
    row = next(line for line in out.splitlines() if line.startswith(f"|{task}"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == metric, row
    return float(cells[6])


def test_lm_eval_generation_example(server):
    """lm-eval's own local-chat-completions client runs the local task through the server."""
    out = run_example(["bash", str(EXAMPLES / "lm_eval_generate.sh")], example_env(server), timeout=300)
    assert lm_eval_score(out, "dllm_tiny_tasks", "exact_match") >= 0.9, out


def test_lm_eval_likelihood_example(server):
    """The ELBO path: dllm-serve's lm-eval model class on the local multiple-choice task."""
    out = run_example(["bash", str(EXAMPLES / "lm_eval_likelihood.sh")], example_env(server), timeout=600)
    assert lm_eval_score(out, "dllm_mc", "acc") >= 0.75, out
