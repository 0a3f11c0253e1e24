"""Reading config.json the same way in every family.

An option a native model does not implement is a load error that names it (never silently
ignored), in one wording: the message points at ``--trust-remote-code``. Token roles are read by
the same rules everywhere: ``eos_token_id`` may be a list (its first id is the eos), and a
diffusion checkpoint must name its mask token.
"""

from __future__ import annotations

from typing import Any


def llama_style_problems(raw: dict[str, Any], *, attention_bias: bool = True) -> list[str]:
    """The Llama/Qwen-style options no native stack implements, as ``key=value`` strings:
    ``attention_bias`` (unless the family has q/k/v biases), another ``hidden_act`` than SiLU, a
    non-default ``rope_scaling``, ``use_sliding_window``."""
    problems = []
    if attention_bias and raw.get("attention_bias"):
        problems.append("attention_bias=true")
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={raw.get('hidden_act')!r}")
    scaling = raw.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        problems.append(f"rope_scaling={scaling!r}")
    if raw.get("use_sliding_window"):
        problems.append("use_sliding_window=true")
    return problems


def refuse(family: str, problems: list[str]) -> None:
    """ValueError naming every unsupported option, when there is any."""
    if problems:
        raise ValueError(
            f"{family} config options not supported by the native model: {problems}; "
            "use --trust-remote-code to run the checkpoint's own code"
        )


def first_eos(raw: dict[str, Any]) -> int | None:
    """``eos_token_id``, or the first of a list of them; None when absent."""
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)


def required_eos(raw: dict[str, Any]) -> int:
    eos = first_eos(raw)
    if eos is None:
        raise ValueError("config.json has no eos_token_id")
    return eos


def required_mask(raw: dict[str, Any]) -> int:
    mask = raw.get("mask_token_id")
    if mask is None or int(mask) < 0:
        raise ValueError("config.json has no mask_token_id; a diffusion checkpoint must name its mask token")
    return int(mask)


def qwen3_stack_fields(raw: dict[str, Any], *, max_positions: int) -> dict[str, Any]:
    """The Qwen3-style stack's config fields and token roles (Nemotron-Diffusion, SDAR), after
    refusing what no native stack implements (the caller names its family in ``refuse`` first
    when it has extra checks); ``max_positions`` is the family's default context."""
    mask = required_mask(raw)
    eos = required_eos(raw)
    pad = raw.get("pad_token_id")
    heads = raw["num_attention_heads"]
    return dict(
        hidden_size=raw["hidden_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        intermediate_size=raw["intermediate_size"],
        vocab_size=raw["vocab_size"],
        rope_theta=float(raw.get("rope_theta", 1_000_000.0)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=raw.get("max_position_embeddings", max_positions),
        mask_token_id=mask,
        eos_token_id=eos,
        pad_token_id=int(pad) if pad is not None else eos,
        bos_token_id=raw.get("bos_token_id"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )
