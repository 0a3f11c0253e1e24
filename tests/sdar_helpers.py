"""Builders for SDAR test checkpoints (SDARForCausalLM format) with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dllm_serve.models.sdar import SDARConfig, SDARModel, sdar_config_dict
from tests.helpers import random_like, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_SDAR = REPO / "models" / "tiny-sdar"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def random_sdar_config(**overrides) -> SDARConfig:
    """Tiny Qwen3-shaped config with the bundled tokenizer's special ids (GQA 4:2, block 4)."""
    vocab = json.loads((TINY_SDAR / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    base = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        vocab_size=len(vocab["model"]["vocab"]),
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        mask_token_id=ids["<|MASK|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        block_size=4,
    )
    base.update(overrides)
    return SDARConfig(**base)


def random_sdar_weights(cfg: SDARConfig, seed: int = 0, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Published-name tensors of a random SDAR."""
    return random_like(SDARModel(cfg).export_state_dict(), seed, scale, norm_jitter=0.2)


def write_sdar_checkpoint(
    directory: Path, cfg: SDARConfig, tensors: dict[str, torch.Tensor], *, shards: int = 1
) -> Path:
    """A checkpoint directory in the published layout, with the bundled tokenizer and chat template."""
    config = sdar_config_dict(cfg)
    return write_checkpoint(directory, config, TINY_SDAR, TOKENIZER_FILES, tensors, shards=shards)
