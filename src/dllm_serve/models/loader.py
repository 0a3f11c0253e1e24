"""Find a checkpoint, detect its architecture from config.json and build the native model.

Paths are local directories or hub ids resolved from the local Hugging Face cache only (serving
machines are usually offline). Weights are safetensors, single-file or sharded with an index.
``load_format="dummy"`` builds random weights from the config alone, for benchmarks of real shapes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dllm_serve.models import registry
from dllm_serve.models.base import DiffusionLM
from dllm_serve.models.registry import detect_family
from dllm_serve.models.tokenizer import ChatTokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(FileNotFoundError):
    """A model path that is neither a directory nor a hub id in the local cache."""


class CheckpointLoadError(ValueError):
    """A checkpoint directory that exists but cannot be loaded; the message names the file and cause."""


def one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception, at most 200 characters (torch's messages run long)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= 200 else text[:197] + "..."


def read_config(path: Path) -> dict[str, Any]:
    """``path/config.json`` as a dict, or an error naming the file."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointLoadError(f"cannot read {path / 'config.json'}: {one_line(exc)}") from exc
    if not isinstance(config, dict):
        raise CheckpointLoadError(f"{path / 'config.json'} is not a JSON object")
    return config


@dataclass
class RemoteModel:
    """The checkpoint's own model, with what the server needs to know of any model."""

    module: Any  # the checkpoint's own nn.Module; its generate() and extras come with its code
    max_length: int
    eos_token_id: int | None
    stop_ids: tuple[int, ...]


@dataclass
class LoadedModel:
    model: DiffusionLM | RemoteModel  # RemoteModel: the checkpoint's own code (--trust-remote-code)
    tokenizer: ChatTokenizer
    family: str  # a registered family's name (models/registry.py)
    path: Path
    config: dict[str, Any]
    # Decoding defaults the checkpoint implies (DecodeParams field names: Nemotron's block_size ->
    # block_length, shift_logits); precedence: preset < these < the request.
    decode_defaults: dict[str, Any] = field(default_factory=dict)


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A local checkpoint directory, or the newest snapshot of a hub id in the local HF cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json; is it a model directory?")
        return path
    text = str(name_or_path)
    if "/" in text and not path.exists() and not text.startswith((".", "/")):
        hub = Path(
            os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub"
        )
        repo = hub.expanduser() / ("models--" + text.replace("/", "--"))
        ref = repo / "refs" / "main"
        snapshots = repo / "snapshots"
        if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
            return snapshots / ref.read_text().strip()
        if snapshots.is_dir():
            candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
            if candidates:
                return candidates[-1]
        raise ModelNotFoundError(
            f"model {text!r} is not in the local Hugging Face cache ({hub}); download it first, e.g. "
            f"`hf download {text}`, or pass a local directory"
        )
    raise ModelNotFoundError(f"model path {path} does not exist")


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ...
        raise CheckpointLoadError(f"cannot read {path}: {one_line(exc)}") from exc


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, single-file or sharded with model.safetensors.index.json."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointLoadError(f"cannot read {index}: {one_line(exc)}") from exc
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_load_file(path / shard))
        missing = set(weight_map) - set(tensors)
        if missing:
            raise ValueError(
                f"sharded checkpoint {path} is missing tensors listed in its index: {sorted(missing)[:5]}"
            )
        return tensors
    single = path / "model.safetensors"
    if single.is_file():
        return _load_file(single)
    raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")


def load_tokenizer(path: Path) -> ChatTokenizer:
    """The checkpoint's tokenizer, or an error naming the directory."""
    try:
        return ChatTokenizer(path)
    except Exception as exc:  # tokenizers/transformers raise many types for a bad tokenizer.json
        raise CheckpointLoadError(f"cannot load the tokenizer in {path}: {one_line(exc)}") from exc


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    load_format: str = "safetensors",
    tokenizer_path: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Build the native model for a checkpoint and put it on ``device`` in ``dtype``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if load_format not in {"safetensors", "dummy"}:
        raise ValueError(f"load_format must be 'safetensors' or 'dummy', got {load_format!r}")
    path = resolve_model_path(name_or_path)
    config = read_config(path)
    spec = registry.get(detect_family(config))
    tokenizer = load_tokenizer(Path(tokenizer_path or path))
    with torch.device("meta"):
        model = spec.build(config, tokenizer)
    # Allocate straight in the target dtype (a bf16 8B model never exists in float32 on the device);
    # weights are cast as they are copied in. RoPE frequencies are computed afterwards, in float32.
    model = model.to(dtype=DTYPES[dtype]).to_empty(device=device)
    if load_format == "dummy":
        _init_dummy(model)
    else:
        tensors = load_safetensors(path)
        try:
            model.load_official(tensors)
        except (KeyError, RuntimeError, ValueError) as exc:  # a missing tensor, a shape that differs
            raise CheckpointLoadError(
                f"weights in {path} do not fit the {spec.name} model its config.json describes: "
                f"{one_line(exc)}"
            ) from exc
    model.rotary.reset()
    model.eval().requires_grad_(False)
    log.info("loaded %s model from %s (%s, %s, %s)", spec.name, path, dtype, device, load_format)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        family=spec.name,
        path=path,
        config=config,
        decode_defaults=spec.defaults_for(config),
    )


def _init_dummy(model: DiffusionLM) -> None:
    """Random weights with a fixed seed: norms at 1, matrices at std 0.02, drawn on the model's own
    device (an 8B model's weights take seconds there, a minute on the host)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or "norm" in name or name.endswith("ln_f"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
