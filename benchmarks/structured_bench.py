"""Constrained vs free decoding on the CPU: tokens/s, tokens per forward, and task accuracy.

Two workloads, each run free and constrained on the same prompts, seeds and parameters:

- ``tasks``: the bundled task suites' held-out prompts (docs/tasks.md). The constraint is a regex
  of the answer's format (``copy``: 16 lower-case letters separated by spaces; ``same_case``: 16
  letters all lower-case or all upper-case), so accuracy with and without the constraint compares
  directly: what the commit rule costs in forwards, and what a grammar buys on the dependent suite.
- ``json``: chat prompts asking for JSON, constrained by schemas of tests/structured_schemas.py.
  The tiny models never saw JSON, so the free outputs are not JSON; this compares speed only.

    OMP_NUM_THREADS=1 python benchmarks/structured_bench.py > benchmarks/structured_cpu.jsonl
    OMP_NUM_THREADS=1 python benchmarks/structured_bench.py --run tiny-nemotron-labs:nemotron_labs \
        --run tiny-nemotron-labs:nemotron_labs_ar --run tiny-nemotron-labs:nemotron_labs_spec \
        > benchmarks/structured_labs_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.structured_schemas import SCHEMAS  # noqa: E402

from dllm_serve.bench.tasks import heldout_examples, is_correct  # noqa: E402
from dllm_serve.config import EngineConfig  # noqa: E402
from dllm_serve.engine import grammar  # noqa: E402
from dllm_serve.engine.constrained import RowConstraint  # noqa: E402
from dllm_serve.engine.engine import Engine  # noqa: E402
from dllm_serve.engine.sequence import GenerationRequest  # noqa: E402
from dllm_serve.models.loader import load_model  # noqa: E402

FORMATS = {  # the answer format of each task, as a regex
    "copy": r"[a-z]( [a-z]){15}",
    "shift": r"[a-z]( [a-z]){11}",
    "upper": r"[A-Z]( [A-Z]){13}",
    "increment": r"[0-9]( [0-9]){19}",
    "same_case": r"[a-z]( [a-z]){15}|[A-Z]( [A-Z]){15}",
}
JSON_SCHEMAS = (
    "flat",
    "nested",
    "array_of_objects",
    "enum",
    "pattern",
    "many_required",
    "optional_fields",
    "refs",
)
RUNS = [("tiny-llada", "dinfer_blockwise"), ("tiny-llada", "llada"), ("tiny-nemotron", "nemotron")]
PROMPTS = 48  # per suite
REPEATS = 3


def _run(engine: Engine, requests: list[GenerationRequest]) -> tuple[dict, float]:
    start = time.perf_counter()
    results = engine.run_to_completion(requests)
    return results, time.perf_counter() - start


def _figures(results: dict, wall: float) -> dict:
    tokens = sum(len(r.token_ids) + int(r.stopped_on_token) for r in results.values())
    forwards = sum(r.forwards for r in results.values())
    return {
        "tokens": tokens,
        "forwards": forwards,
        "tokens_per_forward": round(tokens / forwards, 3),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
    }


def task_rows(engine: Engine, model: str, preset: str, vocab) -> list[dict]:
    tok = engine.loaded.tokenizer
    out = []
    for suite in ("standard", "dependent"):
        examples = heldout_examples(PROMPTS, suite=suite)
        compiled = {t: grammar.regex(rx, vocab, 64) for t, rx in FORMATS.items()}
        for constrained in (False, True):
            walls, figures, accuracy = [], None, None
            for _ in range(REPEATS):
                reqs = [
                    GenerationRequest(
                        f"{i}",
                        tok.render_chat([{"role": "user", "content": ex.prompt}]),
                        engine.resolve_params(64, {"seed": i}, preset),
                        64,
                        constraint=RowConstraint(compiled[ex.task].row(), compiled[ex.task].closing)
                        if constrained
                        else None,
                    )
                    for i, ex in enumerate(examples)
                ]
                results, wall = _run(engine, reqs)
                walls.append(wall)
                figures = _figures(results, wall)
                right = [
                    is_correct(ex, tok.decode(results[f"{i}"].token_ids)) for i, ex in enumerate(examples)
                ]
                accuracy = round(100 * sum(right) / len(right), 1)
            figures.update(wall_s=round(statistics.median(walls), 3))
            figures["tokens_per_s"] = round(figures["tokens"] / figures["wall_s"], 1)
            out.append(
                {
                    "workload": f"tasks/{suite}",
                    "model": model,
                    "preset": preset,
                    "constrained": constrained,
                    "prompts": len(examples),
                    "accuracy": accuracy,
                    **figures,
                }
            )
    return out


def json_rows(engine: Engine, model: str, preset: str, vocab) -> list[dict]:
    tok = engine.loaded.tokenizer
    prompt = tok.render_chat([{"role": "user", "content": "Answer in JSON."}])
    compiled = {name: grammar.json_schema(SCHEMAS[name], vocab, 96) for name in JSON_SCHEMAS}
    out = []
    for constrained in (False, True):
        walls, figures, valid = [], None, 0
        for _ in range(REPEATS):
            reqs = [
                GenerationRequest(
                    f"{name}-{s}",
                    prompt,
                    engine.resolve_params(96, {"seed": s, "temperature": 1.0}, preset),
                    96,
                    constraint=RowConstraint(compiled[name].row(), compiled[name].closing)
                    if constrained
                    else None,
                )
                for name in JSON_SCHEMAS
                for s in range(4)
            ]
            results, wall = _run(engine, reqs)
            walls.append(wall)
            figures = _figures(results, wall)
            valid = 0
            for r in results.values():
                try:
                    json.loads(tok.decode(r.token_ids))
                    valid += 1
                except json.JSONDecodeError:
                    pass
        figures.update(wall_s=round(statistics.median(walls), 3))
        figures["tokens_per_s"] = round(figures["tokens"] / figures["wall_s"], 1)
        out.append(
            {
                "workload": "json",
                "model": model,
                "preset": preset,
                "constrained": constrained,
                "prompts": len(JSON_SCHEMAS) * 4,
                "parses_as_json": valid,
                **figures,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", metavar="MODEL:PRESET", help="a bundled model and a preset")
    args = parser.parse_args()
    runs = [tuple(r.split(":", 1)) for r in args.run] if args.run else RUNS
    for model, preset in runs:
        loaded = load_model(ROOT / "models" / model)
        engine = Engine(loaded, EngineConfig(max_batch_size=64))
        vocab = grammar.vocab_for(loaded.tokenizer, engine.runner.stop_ids)
        for row in task_rows(engine, model, preset, vocab) + json_rows(engine, model, preset, vocab):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
