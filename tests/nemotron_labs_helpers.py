"""Builders for Nemotron-Labs-Diffusion test checkpoints (NemotronLabsDiffusionModel format)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dllm_serve.models.nemotron_labs import (
    NemotronLabsConfig,
    NemotronLabsModel,
    RopeParameters,
    labs_config_dict,
)
from tests.helpers import random_like, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_LABS = REPO / "models" / "tiny-nemotron-labs"
TINY_NEMOTRON = REPO / "models" / "tiny-nemotron"  # the tokenizer the tiny labs model keeps
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
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
    vocab = json.loads((TINY_NEMOTRON / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    base = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        vocab_size=len(vocab["model"]["vocab"]),
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        mask_token_id=ids["<|mask|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        rope=YARN,
        dlm_paradigm="block_diff",
        block_size=8,
    )
    base.update(overrides)
    return NemotronLabsConfig(**base)


def random_labs_weights(
    cfg: NemotronLabsConfig, seed: int = 0, scale: float = 0.2
) -> dict[str, torch.Tensor]:
    """Published-name tensors of a random Nemotron-Labs model."""
    return random_like(NemotronLabsModel(cfg).export_state_dict(), seed, scale, norm_jitter=0.2)


def write_labs_checkpoint(directory: Path, cfg: NemotronLabsConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """A checkpoint directory in the published layout, with the tiny tokenizer and chat template."""
    return write_checkpoint(directory, labs_config_dict(cfg), TINY_NEMOTRON, TOKENIZER_FILES, tensors)
