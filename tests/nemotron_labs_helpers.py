"""Builders for Nemotron-Labs-Diffusion test checkpoints (NemotronLabsDiffusionModel format)."""

from __future__ import annotations

from pathlib import Path

import torch

from dllm_serve.models.nemotron_labs import (
    NemotronLabsConfig,
    NemotronLabsModel,
    RopeParameters,
    labs_config_dict,
)
from tests.helpers import TOKENIZER_FILES, random_like, small_qwen_shape, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_LABS = REPO / "models" / "tiny-nemotron-labs"
TINY_NEMOTRON = REPO / "models" / "tiny-nemotron"  # the tokenizer the tiny labs model keeps
# YaRN and Llama-4 query scaling both active inside a short test sequence.
YARN = RopeParameters(
    rope_theta=10000.0,
    rope_type="yarn",
    factor=4.0,
    original_max_position_embeddings=16,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=1.0,
    mscale_all_dim=0.5,
    llama_4_scaling_beta=0.1,
)


def random_labs_config(**overrides) -> NemotronLabsConfig:
    """Tiny Ministral-shaped config with the tokenizer's special ids (GQA 4:2)."""
    shape = small_qwen_shape(
        TINY_NEMOTRON, "<|mask|>", rms_norm_eps=1e-5, rope=YARN, dlm_paradigm="block_diff", block_size=8
    )
    del shape["rope_theta"]  # YaRN's parameters carry it
    shape.update(overrides)
    return NemotronLabsConfig(**shape)


def random_labs_weights(
    cfg: NemotronLabsConfig, seed: int = 0, scale: float = 0.2
) -> dict[str, torch.Tensor]:
    """Published-name tensors of a random Nemotron-Labs model."""
    return random_like(NemotronLabsModel(cfg).export_state_dict(), seed, scale, norm_jitter=0.2)


def write_labs_checkpoint(directory: Path, cfg: NemotronLabsConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """A checkpoint directory in the published layout, with the tiny tokenizer and chat template."""
    return write_checkpoint(directory, labs_config_dict(cfg), TINY_NEMOTRON, TOKENIZER_FILES, tensors)
