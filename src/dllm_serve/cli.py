"""`dllm-serve`: one entry point, one sub-command per job.

Each area registers its own sub-commands (``register(subparsers)``) next to the code it drives,
so the flags live beside what they configure; this module only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules exposing ``register(subparsers)``.
COMMAND_MODULES = (
    "dllm_serve.commands",  # generate, eval, models
    "dllm_serve.server.cli",  # serve
    "dllm_serve.bench.cli",  # bench serve, bench engine
    "dllm_serve.checkpoints.cli",  # convert-dcp
    "dllm_serve.cluster.cli",  # slurm
    "dllm_serve.evaluation.cli",  # lm-eval
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dllm-serve", description="Serve diffusion language models.")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (OSError, ValueError) as exc:  # bad paths, refused checkpoints, invalid settings
        if args.verbose:
            raise
        print(f"dllm-serve {args.command}: error: {exc} (--verbose for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
