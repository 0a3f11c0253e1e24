"""Serve a checkpoint through its own modeling code and its own ``generate`` (``--trust-remote-code``).

For checkpoint revisions the native models do not know yet: transformers imports the Python files
the checkpoint ships (``auto_map`` in config.json) and we call the model's ``generate``. This runs
code from the checkpoint directory, so it happens only when the operator passes
``--trust-remote-code``; without it :func:`load_remote_model` refuses.

A remote ``generate`` decides everything itself (caching, batching, its own forward count), so a
request runs alone, start to finish, in one call (``dllm_serve.engine.remote.RemoteEngine``, which
also builds the call's arguments from the request's parameters). Its keyword arguments are filtered
by the function's signature: a revision that lacks ``shift_logits``
or names ``block_length`` differently is not handed arguments it would reject. Requests take the
presets of the registry's remote-code family (``FamilySpec.remote_code``: the checkpoint's own
family when it declares it, else Nemotron, whose knobs - steps, block_length, threshold,
shift_logits, temperature - are those of Nemotron's own ``generate``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from dllm_serve.models.loader import (
    DTYPES,
    CheckpointLoadError,
    LoadedModel,
    RemoteModel,
    load_tokenizer,
    one_line,
    read_config,
    resolve_model_path,
)
from dllm_serve.models.registry import REMOTE_AUTO_CLASSES, has_remote_code, remote_family

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 4096  # context limit when config.json names none


class RemoteCodeRefusedError(PermissionError):
    """The checkpoint needs its own code and --trust-remote-code was not given."""


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
