"""Offline sub-commands: `generate` (one prompt), `eval` (the bundled task set), `models`.

They drive the same engine as the server, on the caller's thread (Engine.run_to_completion).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import typing
from collections.abc import Iterator
from typing import Any

from dllm_serve.config import add_engine_arguments, engine_config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate one completion on this machine and print it")
    add_engine_arguments(gen)
    add_decoding_arguments(gen)
    gen.add_argument(
        "--gen-length",
        "--max-tokens",
        dest="gen_length",
        type=int,
        default=128,
        help="tokens to generate at most",
    )
    gen.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
    gen.add_argument("--stats", action="store_true", help="print forwards and timing to stderr")
    gen.add_argument(
        "--show", action="store_true", help="draw the canvas unmasking live (plain text when not a terminal)"
    )
    gen.add_argument("prompt")
    gen.set_defaults(func=run_generate)

    ev = sub.add_parser("eval", help="accuracy and speed on the bundled synthetic task suites")
    add_engine_arguments(ev)
    add_decoding_arguments(ev)
    ev.add_argument(
        "--suite",
        choices=["standard", "dependent"],
        default="standard",
        help="standard: one right answer per prompt; dependent: answers whose tokens constrain each "
        "other, checked by a rule (docs/tasks.md)",
    )
    ev.add_argument("--limit", type=int, default=200, help="held-out prompts to run")
    ev.add_argument("--gen-length", dest="gen_length", type=int, default=48)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=run_eval)

    models = sub.add_parser("models", help="describe a model and the algorithms it supports")
    models.add_argument("--model-path", default=None)
    models.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="KV-cache dtype"
    )
    models.add_argument(
        "--kv-cache-memory", default="2GiB", help="budget for the 'tokens that fit' figures (default 2GiB)"
    )
    models.add_argument(
        "--prompt-cache-memory",
        default=None,
        help="block-causal models: the prompt cache carved out of that budget (default a tenth)",
    )
    models.set_defaults(func=run_models)


def _decoding_flags() -> list[tuple[str, type, str]]:
    """(name, type, help) of every decoding parameter (``DecodeParams``' knobs), shared by generate
    and eval; a flag left out (None) means the preset's default."""
    from dllm_serve.engine.algorithms import KNOBS, DecodeParams

    hints = typing.get_type_hints(DecodeParams)
    out = []
    for name, spec in KNOBS.items():
        kind = next(t for t in (*typing.get_args(hints[name]), hints[name]) if t is not type(None))
        extra = f" (one of {', '.join(spec.choices)})" if spec.choices else ""
        out.append((name, kind, spec.help + extra))
    return out


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("decoding (defaults come from the algorithm preset)")
    for name, kind, text in _decoding_flags():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            g.add_argument(flag, dest=name, type=kind, default=None, help=text.replace("%", "%%"))


def decoding_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = [name for name, _, _ in _decoding_flags()]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from dllm_serve.engine.algorithms import ParamError
    from dllm_serve.engine.engine import Engine, build_engine
    from dllm_serve.engine.sequence import GenerationRequest

    if not args.prompt.strip():
        raise ValueError("the prompt is empty; pass the text to complete, e.g. dllm-serve generate 'Hello'")
    engine = build_engine(engine_config_from_args(args))
    tok = engine.loaded.tokenizer
    if args.no_chat_template or not tok.has_chat_template:
        ids = tok.encode(args.prompt)
    else:
        ids = tok.render_chat([{"role": "user", "content": args.prompt}])
    try:
        params = engine.resolve_params(args.gen_length, decoding_overrides(args))
    except ParamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    request = GenerationRequest("generate", ids, params, args.gen_length)
    if args.show and sys.stdout.isatty() and isinstance(engine, Engine):  # the native engine traces steps
        from dllm_serve.terminal_view import generate_with_view

        result = generate_with_view(engine, request, sys.stdout)
    else:
        result = engine.run_to_completion([request])["generate"]
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    print(tok.decode(result.token_ids))
    if args.stats:
        n = len(result.token_ids) + int(result.stopped_on_token)
        print(
            f"[{params.algorithm}] {n} tokens, {result.forwards} forwards, "
            f"{time.perf_counter() - start:.2f}s, "
            f"finish_reason={result.finish_reason}, threads={torch.get_num_threads()}",
            file=sys.stderr,
        )
    return 0


def evaluate(
    engine,
    algorithm: str,
    limit: int,
    gen_length: int,
    overrides: dict[str, Any],
    suite: str = "standard",
) -> dict[str, Any]:
    """Run a suite's held-out synthetic tasks through ``engine``; accuracy and throughput figures."""
    from dllm_serve.bench.tasks import heldout_examples, is_correct
    from dllm_serve.engine.sequence import GenerationRequest

    tok = engine.loaded.tokenizer
    examples = heldout_examples(limit, suite=suite)
    params = engine.resolve_params(gen_length, {"seed": 0, **overrides}, algorithm)
    requests = [
        GenerationRequest(
            f"eval-{i}", tok.render_chat([{"role": "user", "content": ex.prompt}]), params, gen_length
        )
        for i, ex in enumerate(examples)
    ]
    start = time.perf_counter()
    with _progress(engine, len(requests)):
        results = engine.run_to_completion(requests)
    wall = time.perf_counter() - start
    by_task: dict[str, list[bool]] = {}
    generated = forwards = 0
    for req, ex in zip(requests, examples, strict=True):
        res = results[req.request_id]
        by_task.setdefault(ex.task, []).append(is_correct(ex, tok.decode(res.token_ids)))
        generated += len(res.token_ids) + int(res.stopped_on_token)
        forwards += res.forwards
    correct = sum(sum(v) for v in by_task.values())
    return {
        "model": str(engine.loaded.path),
        "suite": suite,
        "algorithm": params.algorithm,
        "params": {k: v for k, v in params.to_dict().items() if k != "seed"},
        "batch_size": engine.config.max_batch_size,
        "num_prompts": len(examples),
        "accuracy": round(100.0 * correct / len(examples), 2),
        "accuracy_by_task": {t: round(100.0 * sum(v) / len(v), 2) for t, v in sorted(by_task.items())},
        "generated_tokens": generated,
        "forwards": forwards,
        "forwards_per_token": round(forwards / max(1, generated), 4),
        "tokens_per_forward": round(generated / max(1, forwards), 4),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(generated / wall, 2),
    }


@contextlib.contextmanager
def _progress(engine, total: int) -> Iterator[None]:
    """A bar of finished prompts on stderr when it is a terminal (logs and pipes stay clean)."""
    if not sys.stderr.isatty():
        yield
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="prompt", desc="eval", file=sys.stderr) as bar:

        def observe(info) -> None:
            bar.update(info.finished)

        engine.step_observers.append(observe)
        try:
            yield
        finally:
            engine.step_observers.remove(observe)


def run_eval(args: argparse.Namespace) -> int:
    from dllm_serve.engine.engine import build_engine

    engine = build_engine(engine_config_from_args(args))
    report = evaluate(
        engine, engine.default_algorithm, args.limit, args.gen_length, decoding_overrides(args), args.suite
    )
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>20}: {value}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    from dllm_serve.config import DEFAULT_MODEL
    from dllm_serve.engine.algorithms import describe_parameters, describe_presets, describe_rules
    from dllm_serve.models.loader import resolve_model_path
    from dllm_serve.models.registry import detect_family

    path = resolve_model_path(args.model_path or DEFAULT_MODEL)
    config = json.loads((path / "config.json").read_text())
    family = detect_family(config)
    report = {
        "model": str(path),
        "family": family,
        "kv_cache": kv_cache_figures(config, args.dtype, args.kv_cache_memory, args.prompt_cache_memory),
        "algorithms": describe_presets(family),
        "rules": describe_rules(),
        "parameters": describe_parameters(),
    }
    print(json.dumps(report, indent=2))
    return 0


def kv_cache_figures(
    config: dict[str, Any], dtype: str, budget: str, prompt_cache: str | None = None
) -> dict[str, Any]:
    """KV bytes per token, the prompt cache carved out of ``budget`` (block-causal models), and the
    tokens and longest sequences that fit in the rest."""
    import torch

    from dllm_serve.bench.hardware import shape_from_config
    from dllm_serve.config import EngineConfig
    from dllm_serve.engine.kv_cache import extent_tokens, kv_bytes_per_token
    from dllm_serve.engine.memory import KVPlan, parse_bytes, prompt_cache_bytes
    from dllm_serve.models.registry import find_family

    shape = shape_from_config(config)
    per_token = kv_bytes_per_token(shape.n_layers, shape.n_kv_heads, shape.head_dim, getattr(torch, dtype))
    family = find_family(config)
    block_causal = family is not None and family.attention in ("block_causal", "aligned_block_causal")
    carved = prompt_cache_bytes(
        parse_bytes(budget), EngineConfig(prompt_cache_memory=prompt_cache), block_causal
    )
    plan = KVPlan(parse_bytes(budget), f"--kv-cache-memory {budget}", per_token, carved)
    return {
        "dtype": dtype,
        "bytes_per_token": per_token,
        "budget_bytes": plan.budget_bytes,
        "prompt_cache_bytes": plan.prompt_cache_bytes,
        "tokens_that_fit": plan.capacity,
        "max_model_len": shape.max_length,
        "longest_sequences_that_fit": plan.capacity // extent_tokens(shape.max_length),
    }
