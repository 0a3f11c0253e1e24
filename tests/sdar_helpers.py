"""Builders for SDAR test checkpoints (SDARForCausalLM format) with random weights."""

from __future__ import annotations

from pathlib import Path

import torch

from dllm_serve.models.sdar import SDARConfig, SDARModel, sdar_config_dict
from dllm_serve.models.sdar_moe import SDARMoeConfig, SDARMoeModel, sdar_moe_config_dict
from tests.helpers import TOKENIZER_FILES, random_like, small_qwen_shape, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_SDAR = REPO / "models" / "tiny-sdar"
TINY_SDAR_MOE = REPO / "models" / "tiny-sdar-moe"


def random_sdar_config(**overrides) -> SDARConfig:
    """Tiny Qwen3-shaped config with the bundled tokenizer's special ids (GQA 4:2, block 4)."""
    return SDARConfig(**{**small_qwen_shape(TINY_SDAR, "<|MASK|>", block_size=4), **overrides})


def random_sdar_weights(cfg: SDARConfig, seed: int = 0, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Published-name tensors of a random SDAR."""
    return random_like(SDARModel(cfg).export_state_dict(), seed, scale, norm_jitter=0.2)


def write_sdar_checkpoint(
    directory: Path, cfg: SDARConfig, tensors: dict[str, torch.Tensor], *, shards: int = 1
) -> Path:
    """A checkpoint directory in the published layout, with the bundled tokenizer and chat template."""
    config = sdar_config_dict(cfg)
    return write_checkpoint(directory, config, TINY_SDAR, TOKENIZER_FILES, tensors, shards=shards)


def random_sdar_moe_config(**overrides) -> SDARMoeConfig:
    """The same tiny stack as SDAR-MoE: 3 layers, 4 experts of 32, 2 per token, renormalised."""
    fields = small_qwen_shape(TINY_SDAR, "<|MASK|>", block_size=4, num_hidden_layers=3)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
    return SDARMoeConfig(**{**fields, **moe, **overrides})


def random_sdar_moe_weights(cfg: SDARMoeConfig, seed: int = 0, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Published-name tensors of a random SDAR-MoE (per-expert ``mlp.experts.{e}.*`` tensors)."""
    return random_like(SDARMoeModel(cfg).export_state_dict(), seed, scale, norm_jitter=0.2)


def write_sdar_moe_checkpoint(directory: Path, cfg: SDARMoeConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """An SDARMoeForCausalLM checkpoint directory with the bundled SDAR tokenizer."""
    return write_checkpoint(directory, sdar_moe_config_dict(cfg), TINY_SDAR, TOKENIZER_FILES, tensors)
