"""``dllm-serve lm-eval``: lm-eval's ``run`` with the dllm-serve model class against a server.

    dllm-serve lm-eval --base-url http://127.0.0.1:8000 --tasks arc_easy --model-args mc_num=128 \\
        -- --limit 100 --output_path results/

Everything after ``--`` goes to ``lm-eval run`` unchanged. ``--local-tasks`` writes the local
tasks built from the bundled task set (``dllm_mc``, ``dllm_ppl``) to a temporary directory and
includes it. lm-eval is an optional dependency (``pip install 'dllm-serve[eval]'``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lm-eval", help="run lm-eval against a dllm-serve server (needs dllm-serve[eval])")
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated")
    p.add_argument(
        "--model-args",
        default="",
        help="extra model args k=v,... (mc_num, cfg_scale, seed, tokenizer, steps, ...; docs/evaluation.md)",
    )
    p.add_argument("--local-tasks", action="store_true", help="include the local tasks dllm_mc and dllm_ppl")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="-- then arguments for `lm-eval run`")
    p.set_defaults(func=run)


def lm_eval_argv(args: argparse.Namespace, include: str | None) -> list[str]:
    model_args = ",".join(a for a in (f"base_url={args.base_url}", args.model_args) if a)
    extra = list(args.lm_eval_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    argv = ["run", "--model", "dllm-serve", "--model_args", model_args, "--tasks", args.tasks]
    if include:
        argv += ["--include_path", include]
    return argv + extra


def run(args: argparse.Namespace) -> int:
    try:
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging

        import dllm_serve.evaluation.lm_eval_model  # noqa: F401  (registers the "dllm-serve" model)
    except ImportError as exc:
        raise ValueError(f"lm-eval is not installed ({exc}); pip install 'dllm-serve[eval]'") from None
    from dllm_serve.evaluation.local_tasks import write_local_tasks

    with tempfile.TemporaryDirectory(prefix="dllm-lm-eval-") as tmp:
        include = str(write_local_tasks(tmp)) if args.local_tasks else None
        setup_logging()
        parser = HarnessCLI()
        saved, sys.argv = sys.argv, ["lm-eval", *lm_eval_argv(args, include)]  # HarnessCLI reads sys.argv
        try:
            parser.execute(parser.parse_args())
        finally:
            sys.argv = saved
    return 0
