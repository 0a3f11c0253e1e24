"""Where the tensors and the tokenizer of a training checkpoint live on disk.

Training frameworks nest a torch.distributed.checkpoint (DCP) directory differently. We accept what
users point at, so a path to the step, the policy, the weights or the DCP directory itself all work:

- NeMo-RL: ``step_N/policy/weights/.metadata`` with ``step_N/policy/tokenizer/`` beside it;
- a bare DCP directory holding ``.metadata`` and ``*.distcp`` files;
- ``CKPT/model/.metadata`` (a wrapper directory with the model's DCP inside).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

METADATA = ".metadata"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class DCPCheckpointError(ValueError):
    """A DCP checkpoint that cannot be served: missing, truncated or not matching its base model."""


@dataclass(frozen=True)
class CheckpointLayout:
    weights_dir: Path  # the directory holding .metadata
    tokenizer_dir: Path | None  # the checkpoint's own tokenizer, if it saved one
    kind: str  # "nemo-rl" | "model-subdir" | "bare"

    @property
    def name(self) -> str:
        """A readable name for caches and logs: the step directory when there is one."""
        for part in reversed(self.weights_dir.parts):
            if part.startswith(("step_", "step-", "iter_", "global_step")):
                return part
        return self.weights_dir.name if self.kind == "bare" else self.weights_dir.parent.name


def _is_tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES)


def _has_metadata(path: Path) -> bool:
    return (path / METADATA).is_file()


def find_layout(path: str | os.PathLike[str]) -> CheckpointLayout:
    """The DCP directory and tokenizer for a user-given checkpoint path, or a clear error."""
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise DCPCheckpointError(f"DCP checkpoint {root} does not exist")
    if not root.is_dir():
        raise DCPCheckpointError(f"DCP checkpoint {root} is not a directory (pass the checkpoint directory)")

    # NeMo-RL, from the step, the policy or the weights directory.
    for weights in (root / "policy" / "weights", root / "weights", root):
        if weights.name == "weights" and _has_metadata(weights):
            tokenizer = weights.parent / "tokenizer"
            return CheckpointLayout(weights, tokenizer if _is_tokenizer_dir(tokenizer) else None, "nemo-rl")
    if _has_metadata(root):
        tokenizer = root / "tokenizer"
        return CheckpointLayout(root, tokenizer if _is_tokenizer_dir(tokenizer) else None, "bare")
    if _has_metadata(root / "model"):
        found = next((t for t in (root / "tokenizer", root) if _is_tokenizer_dir(t)), None)
        return CheckpointLayout(root / "model", found, "model-subdir")

    steps = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    if steps:
        raise DCPCheckpointError(
            f"{root} holds several training steps ({', '.join(steps[:5])}"
            f"{', ...' if len(steps) > 5 else ''}); pass one of them, e.g. {root / steps[-1]}"
        )
    raise DCPCheckpointError(
        f"no torch.distributed.checkpoint found in {root}: looked for {METADATA} in {root}, "
        f"{root / 'model'}, {root / 'weights'} and {root / 'policy' / 'weights'}"
    )
