"""Builders for Nemotron-diffusion test checkpoints (DiffEncoderModel format) with random weights."""

from __future__ import annotations

from pathlib import Path

import torch

from dllm_serve.models.nemotron import NemotronConfig, nemotron_config_dict
from tests.helpers import TOKENIZER_FILES, random_weights, small_qwen_shape, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_NEMOTRON = REPO / "models" / "tiny-nemotron"


def random_nemotron_config(**overrides) -> NemotronConfig:
    """Tiny Qwen3-shaped config with the bundled tokenizer's special ids (GQA 4:2 by default)."""
    shape = small_qwen_shape(TINY_NEMOTRON, "<|mask|>", dlm_paradigm="block_diff", block_size=8)
    return NemotronConfig(**{**shape, **overrides})


def random_nemotron_weights(
    cfg: NemotronConfig, seed: int = 0, scale: float = 0.2
) -> dict[str, torch.Tensor]:
    """Published-name tensors of a random Nemotron."""
    return random_weights(nemotron_config_dict(cfg), TINY_NEMOTRON, seed, scale, norm_jitter=0.2)


def write_nemotron_checkpoint(
    directory: Path, cfg: NemotronConfig, tensors: dict[str, torch.Tensor], *, shards: int = 1
) -> Path:
    """A checkpoint directory in the published layout, with the bundled tokenizer and chat template."""
    config = nemotron_config_dict(cfg)
    return write_checkpoint(directory, config, TINY_NEMOTRON, TOKENIZER_FILES, tensors, shards=shards)
