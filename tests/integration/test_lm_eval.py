"""Real lm-eval (an optional extra) against real servers with the bundled tiny models.

- the local multiple-choice task (the correct answer among 4 candidates, from the bundled task
  set) reaches >= 90 % accuracy through the dllm-serve model class (ELBO endpoint) and through
  lm-eval's unmodified ``local-completions`` (the echo path);
- the local perplexity task runs through the model class (unconditional ELBO per window), and the
  local generation task (generate_until through /v1/completions) reaches >= 90 % exact match;
- ``dllm-serve lm-eval`` runs lm-eval's own CLI with the model class in one command.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dllm_serve.evaluation.local_tasks import GEN_TASK, MC_TASK, PPL_TASK, write_local_tasks
from tests.helpers import TINY_LLADA
from tests.nemotron_helpers import TINY_NEMOTRON

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("lm_eval.models.openai_completions")  # registers lm-eval's own local-completions
from lm_eval.tasks import TaskManager  # noqa: E402

from dllm_serve.evaluation.lm_eval_model import DllmServeLM  # noqa: E402

LIMIT = 25  # questions per run: 100 candidates


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_local_tasks(tmp_path_factory.mktemp("lm-eval-tasks"))


@pytest.fixture(scope="module", params=["tiny-llada", "tiny-nemotron"])
def served(request, server_factory):
    path = TINY_LLADA if request.param == "tiny-llada" else TINY_NEMOTRON
    return server_factory("--model-path", str(path)), path


def _evaluate(model, model_args: dict | None, tasks, names: list[str]) -> dict:
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=names,
        task_manager=TaskManager(include_path=str(tasks)),
        limit=LIMIT,
        apply_chat_template=True,
    )
    return out["results"]


def test_model_class_multiple_choice_perplexity_and_generation(served, tasks):
    server, path = served
    lm = DllmServeLM(base_url=server.base_url, mc_num=32, tokenizer=str(path), max_length=256)
    results = _evaluate(lm, None, tasks, [MC_TASK, PPL_TASK, GEN_TASK])
    assert results[MC_TASK]["acc,none"] >= 0.9, results
    ppl = results[PPL_TASK]
    assert 0 < ppl["bits_per_byte,none"] < float("inf") and ppl["word_perplexity,none"] > 1
    assert results[GEN_TASK]["exact_match,none"] >= 0.9, results  # generate_until through completions


def test_unmodified_local_completions_multiple_choice(served, tasks):
    server, path = served
    args = {
        "model": server.health()["model"],
        "base_url": server.v1 + "/completions",
        "tokenizer": str(path),
        "tokenizer_backend": "huggingface",
        "num_concurrent": 4,
    }
    results = _evaluate("local-completions", args, tasks, [MC_TASK])
    assert results[MC_TASK]["acc,none"] >= 0.9, results


def test_dllm_serve_lm_eval_command(server_factory, tmp_path):
    server = server_factory("--model-path", str(TINY_LLADA))
    out = tmp_path / "results"
    cmd = [
        sys.executable, "-m", "dllm_serve.cli", "lm-eval", "--base-url", server.base_url, "--tasks", MC_TASK,
        "--local-tasks", "--model-args", f"mc_num=8,tokenizer={TINY_LLADA}",
        "--", "--limit", "8", "--apply_chat_template", "--output_path", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(out.rglob("results*.json")).read_text())
    assert result["results"][MC_TASK]["acc,none"] >= 0.75
    assert result["config"]["model"] == "dllm-serve"
