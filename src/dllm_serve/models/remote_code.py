"""Serve a checkpoint through its own modeling code and its own ``generate`` (``--trust-remote-code``).

For checkpoint revisions the native models do not know yet: transformers imports the Python files
the checkpoint ships (``auto_map`` in config.json) and we call the model's ``generate``. This runs
code from the checkpoint directory, so it happens only when the operator passes
``--trust-remote-code``; without it :func:`load_remote_model` refuses.

A remote ``generate`` decides everything itself (caching, batching, its own forward count), so a
request runs alone, start to finish, in one call (``dllm_serve.engine.remote.RemoteEngine``). Its
keyword arguments are filtered by the function's signature: a revision that lacks ``shift_logits``
or names ``block_length`` differently is not handed arguments it would reject. Requests take the
presets of the registry's remote-code family (``FamilySpec.remote_code``: the checkpoint's own
family when it declares it, else Nemotron, whose knobs - steps, block_length, threshold,
shift_logits, temperature - are those of Nemotron's own ``generate``).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dllm_serve.engine.algorithms import DecodeParams
from dllm_serve.models.loader import (
    DTYPES,
    CheckpointLoadError,
    LoadedModel,
    load_tokenizer,
    one_line,
    read_config,
    resolve_model_path,
)
from dllm_serve.models.registry import REMOTE_AUTO_CLASSES, has_remote_code, remote_family

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 4096  # context limit when config.json names none
# DecodeParams fields offered to a remote generate() under these names (filtered by its signature).
CORE_KWARGS = ("max_new_tokens", "steps", "block_length", "threshold", "shift_logits", "temperature")


class RemoteCodeRefusedError(PermissionError):
    """The checkpoint needs its own code and --trust-remote-code was not given."""


@dataclass
class RemoteModel:
    """The checkpoint's own model, with what the server needs to know of any model."""

    module: nn.Module
    max_length: int
    eos_token_id: int | None
    stop_ids: tuple[int, ...]


def load_remote_model(
    name_or_path: str | os.PathLike[str],
    *,
    trust_remote_code: bool,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Import the checkpoint's own model class and load its weights; refused unless trusted."""
    path = resolve_model_path(name_or_path)
    config = read_config(path)
    if not trust_remote_code:
        raise RemoteCodeRefusedError(
            f"{path} would run its own modeling code; pass --trust-remote-code to allow it"
        )
    if not has_remote_code(config):
        raise ValueError(f"{path}/config.json has no auto_map: the checkpoint ships no modeling code to run")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    import transformers

    auto_class = next(name for name in REMOTE_AUTO_CLASSES if name in config["auto_map"])
    log.warning("running modeling code shipped with %s (--trust-remote-code)", path)
    try:
        module = getattr(transformers, auto_class).from_pretrained(
            str(path), trust_remote_code=True, dtype=DTYPES[dtype]
        )
        module = module.to(device).eval()
    except Exception as exc:  # the checkpoint's own code can raise anything
        raise CheckpointLoadError(
            f"the modeling code shipped with {path} failed to load the model: {one_line(exc)}"
        ) from exc
    tokenizer = load_tokenizer(path)
    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is not None:
        stop_ids = tokenizer.stop_ids(int(eos))
    else:
        stop_ids = (tokenizer.end_of_turn_id,) if tokenizer.end_of_turn_id is not None else ()
    defaults: dict[str, Any] = {}
    if isinstance(config.get("block_size"), int):
        defaults["block_length"] = config["block_size"]
    if isinstance(config.get("shift_logits"), bool):
        defaults["shift_logits"] = config["shift_logits"]
    model = RemoteModel(
        module=module,
        max_length=int(
            config.get("max_position_embeddings") or config.get("max_sequence_length") or DEFAULT_MAX_LENGTH
        ),
        eos_token_id=eos,
        stop_ids=stop_ids,
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        family=remote_family(config).name,  # whose presets' parameters generate() receives
        path=path,
        config=config,
        decode_defaults=defaults,
    )


def generate_kwargs(
    fn: Callable[..., Any], params: DecodeParams, max_new_tokens: int, eos_token_id: int | None = None
) -> dict[str, Any]:
    """The decoding arguments ``fn`` accepts, by name; a ``**kwargs`` generate gets the core set only."""
    offered: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "gen_length": params.gen_length,
        "steps": params.steps,
        "block_length": params.block_length,
        "block_size": params.block_length,
        "threshold": params.threshold,
        "shift_logits": params.shift_logits,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "remasking": params.remasking,
        "factor": params.factor,
        "cfg_scale": params.cfg_scale,
    }
    if eos_token_id is not None:
        offered["eos_token_id"] = eos_token_id
    sig = inspect.signature(fn)
    named = {
        n
        for n, p in sig.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return {k: v for k, v in offered.items() if k in named or (takes_any and k in CORE_KWARGS)}


def _count_forwards(module: nn.Module) -> tuple[list[int], Callable[[], None]]:
    """Count forwards by the input embedding's calls (one per forward however generate calls it)."""
    counter = [0]
    embed = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    target = embed if isinstance(embed, nn.Module) else module

    def hook(*_: Any) -> None:
        counter[0] += 1

    handle = target.register_forward_pre_hook(hook)
    return counter, handle.remove


@torch.inference_mode()
def generate(
    model: RemoteModel, prompt_ids: Sequence[int], params: DecodeParams, max_new_tokens: int
) -> tuple[list[int], int]:
    """One request through the model's own ``generate``: (new token ids, forwards used).

    The tokens are cut after the first stop token (kept, so the caller can tell a stop from a
    length finish) and at ``max_new_tokens``. The forward count is what ``generate`` reports as
    its nfe, or else the forwards counted while it ran.
    """
    module = model.module
    device = next(module.parameters()).device
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    kwargs = generate_kwargs(module.generate, params, max_new_tokens, model.eos_token_id)
    if params.seed is not None:
        torch.manual_seed(params.seed)
    counter, remove = _count_forwards(module)
    try:
        out = module.generate(prompt, **kwargs)
    finally:
        remove()
    nfe = counter[0]
    if isinstance(out, tuple):
        out, reported = out[0], out[1]
        nfe = int(reported) if reported is not None else nfe
    if isinstance(out, torch.Tensor):
        ids = (out[0] if out.dim() == 2 else out).tolist()
    else:
        ids = list(out[0]) if out and isinstance(out[0], (list, tuple)) else list(out)
    if ids[: len(prompt_ids)] == list(prompt_ids):
        ids = ids[len(prompt_ids) :]
    ids = ids[:max_new_tokens]
    stops = set(model.stop_ids)
    cut = next((i for i, t in enumerate(ids) if t in stops), None)
    if cut is not None:
        ids = ids[: cut + 1]
    return ids, nfe
