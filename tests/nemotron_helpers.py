"""Builders for Nemotron-diffusion test checkpoints (DiffEncoderModel format) with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dllm_serve.models.nemotron import NemotronConfig, nemotron_config_dict
from tests.helpers import TOKENIZER_FILES, random_weights, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_NEMOTRON = REPO / "models" / "tiny-nemotron"


def random_nemotron_config(**overrides) -> NemotronConfig:
    """Tiny Qwen3-shaped config with the bundled tokenizer's special ids (GQA 4:2 by default)."""
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
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        mask_token_id=ids["<|mask|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        dlm_paradigm="block_diff",
        block_size=8,
    )
    base.update(overrides)
    return NemotronConfig(**base)


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
