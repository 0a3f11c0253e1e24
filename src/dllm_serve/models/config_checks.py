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
