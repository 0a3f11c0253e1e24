"""Builders for Dream test checkpoints (DreamModel format) with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dllm_serve.models.dream import DreamConfig, DreamModel, dream_config_dict
from tests.helpers import random_like, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_DREAM = REPO / "models" / "tiny-dream"
# The tokenizer (Qwen-style specials: <|endoftext|>, <|im_start|>, <|im_end|>, <|mask|>) comes from the
# bundled Nemotron checkpoint, which tiny-dream shares; the chat template is rewritten to Dream's.
TOKENIZER_FROM = REPO / "models" / "tiny-nemotron"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def special_ids() -> dict[str, int]:
    vocab = json.loads((TOKENIZER_FROM / "tokenizer.json").read_text())
    return {t["content"]: t["id"] for t in vocab["added_tokens"]}


def random_dream_config(**overrides) -> DreamConfig:
    """Tiny Qwen2-shaped config with the bundled tokenizer's special ids (GQA 4:2 by default)."""
    vocab = json.loads((TOKENIZER_FROM / "tokenizer.json").read_text())
    ids = special_ids()
    base = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=len(vocab["model"]["vocab"]),
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        mask_token_id=ids["<|mask|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    base.update(overrides)
    return DreamConfig(**base)


def random_dream_weights(cfg: DreamConfig, seed: int = 0, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Published-name tensors of a random Dream; biases small and random (not near 1 like norms)."""
    out = random_like(DreamModel(cfg).export_state_dict(), seed, scale, norm_jitter=0.2)
    gen = torch.Generator().manual_seed(seed + 1)
    for name in out:
        if name.endswith(".bias"):
            out[name] = torch.randn(out[name].shape, generator=gen) * scale
    return out


def write_dream_checkpoint(
    directory: Path, cfg: DreamConfig, tensors: dict[str, torch.Tensor], *, shards: int = 1
) -> Path:
    """A checkpoint directory in the published layout, with a Qwen-style tokenizer and ChatML template."""
    source = TINY_DREAM if (TINY_DREAM / "config.json").is_file() else TOKENIZER_FROM
    config = dream_config_dict(cfg)
    return write_checkpoint(directory, config, source, TOKENIZER_FILES, tensors, shards=shards)
