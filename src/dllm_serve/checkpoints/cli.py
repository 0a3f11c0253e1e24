"""`dllm-serve convert-dcp`: turn a torch.distributed.checkpoint into a servable model directory.

With ``--output`` the result goes there; without it, into the same cache ``serve --dcp-path`` uses,
so a conversion done ahead of time (e.g. on a login node) is reused by the server. The output path is
the one line printed on stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def _size(text: str) -> int:
    """'5GB', '500MB', '100KB' or a byte count."""
    units = {"TB": 1000**4, "GB": 1000**3, "MB": 1000**2, "KB": 1000, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-dcp",
        help="convert a torch.distributed.checkpoint (NeMo-RL) checkpoint to safetensors",
        description=(
            "Convert a DCP training checkpoint (NeMo-RL step_N/policy/weights, a bare DCP directory, or "
            "CKPT/model) into a model directory with safetensors, config and tokenizer. Prints its path."
        ),
    )
    p.add_argument("dcp_path", metavar="PATH", help="checkpoint: step_N, step_N/policy/weights, or a DCP dir")
    p.add_argument(
        "--base-model",
        required=True,
        help="model dir or hub id (local HF cache): supplies config.json, tokenizer and weight names",
    )
    p.add_argument("--output", "-o", default=None, help="output directory (default: the conversion cache)")
    p.add_argument(
        "--dcp-cache-dir",
        default=None,
        help="cache used without --output (default: $DLLM_SERVE_CACHE or ~/.cache/dllm-serve/dcp)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="cast floating tensors (default: keep the checkpoint's dtype)",
    )
    p.add_argument(
        "--max-shard-size", type=_size, default="5GB", help="safetensors shard limit (default 5GB)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing --output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from dllm_serve.checkpoints.dcp import DCPCheckpointError, convert_checkpoint, ensure_converted
    from dllm_serve.models.loader import ModelNotFoundError

    try:
        if args.output:
            path = convert_checkpoint(
                args.dcp_path,
                args.base_model,
                args.output,
                dtype=args.dtype,
                max_shard_bytes=args.max_shard_size,
                show_progress=not args.no_progress,
                overwrite=args.force,
            )
        else:
            path = ensure_converted(
                args.dcp_path,
                args.base_model,
                args.dcp_cache_dir,
                show_progress=not args.no_progress,
                dtype=args.dtype,
                max_shard_bytes=args.max_shard_size,
            )
    except (DCPCheckpointError, ModelNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
