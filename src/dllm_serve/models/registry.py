"""The model families dllm-serve serves natively: one line per family, its module's ``SPEC``.

Adding a family is its model module (``models/<family>.py``, ending with ``SPEC = FamilySpec(...)``)
and its line in ``FAMILIES`` below; see docs/architecture.md, "Adding a model family".
"""

from __future__ import annotations

from typing import Any

from dllm_serve.models import dream, llada, llada2, nemotron, nemotron_labs, sdar, sdar_moe
from dllm_serve.models.family import FamilySpec

FAMILIES: tuple[FamilySpec, ...] = (
    llada.SPEC,
    nemotron.SPEC,
    nemotron_labs.SPEC,
    sdar.SPEC,
    sdar_moe.SPEC,
    dream.SPEC,
    llada2.SPEC,
)
BY_NAME: dict[str, FamilySpec] = {spec.name: spec for spec in FAMILIES}


def get(name: str) -> FamilySpec:
    """The spec of a registered family; KeyError listing the registered ones otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; registered: {', '.join(BY_NAME)}") from None


def find_family(config: dict[str, Any]) -> FamilySpec | None:
    """The family config.json names, or None: its model_type when a family lists it, else the
    family whose architecture hint matches most specifically (LLaDA2's "llada2moe" over LLaDA's
    "llada" for ``LLaDA2MoeModelLM``)."""
    model_type = str(config.get("model_type", "")).lower()
    by_type = next((spec for spec in FAMILIES if model_type in spec.model_types), None)
    if by_type is not None:
        return by_type
    archs = [str(a).lower() for a in config.get("architectures") or []]
    hits = [(len(h), spec) for spec in FAMILIES for h in spec.architectures if any(h in a for a in archs)]
    return max(hits, key=lambda hit: hit[0])[1] if hits else None


# transformers auto classes a checkpoint's auto_map may name for its own model code, preferred first.
REMOTE_AUTO_CLASSES = ("AutoModel", "AutoModelForMaskedLM", "AutoModelForCausalLM")


def has_remote_code(config: dict[str, Any]) -> bool:
    """Whether config.json points transformers at modeling code shipped with the checkpoint."""
    auto_map = config.get("auto_map") or {}
    return any(key in auto_map for key in REMOTE_AUTO_CLASSES)


def detect_family(config: dict[str, Any]) -> str:
    """The family named by config.json (model_type / architectures), never by the path."""
    spec = find_family(config)
    if spec is not None:
        return spec.name
    hint = (
        "; it ships its own modeling code (auto_map): pass --trust-remote-code to serve it through that code"
        if has_remote_code(config)
        else ""
    )
    supported = ", ".join(
        f"{s.title} (model_type {' / '.join(repr(t) for t in s.model_types)})" for s in FAMILIES
    )
    raise ValueError(
        f"unsupported model: model_type={config.get('model_type')!r}, "
        f"architectures={config.get('architectures')}; supported: {supported}{hint}"
    )


def remote_family(config: dict[str, Any]) -> FamilySpec:
    """The family whose presets a checkpoint's own generate() runs with (--trust-remote-code): its
    own when that family declares ``remote_code``, else the first family that does."""
    spec = find_family(config)
    if spec is not None and spec.remote_code:
        return spec
    return next(s for s in FAMILIES if s.remote_code)


def families_with_attention(attention: str) -> list[FamilySpec]:
    """Families whose models attend this way (the presets declaring it run on them)."""
    return [spec for spec in FAMILIES if spec.attention == attention]
