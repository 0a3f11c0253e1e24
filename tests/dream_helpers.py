"""Builders for Dream test checkpoints (DreamModel format) with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dllm_serve.models.dream import DreamConfig, DreamModel, dream_config_dict
from tests.helpers import TOKENIZER_FILES, random_like, small_qwen_shape, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_DREAM = REPO / "models" / "tiny-dream"
# The tokenizer (Qwen-style specials: <|endoftext|>, <|im_start|>, <|im_end|>, <|mask|>) comes from the
# bundled Nemotron checkpoint, which tiny-dream shares; the chat template is rewritten to Dream's.
TOKENIZER_FROM = REPO / "models" / "tiny-nemotron"


def special_ids() -> dict[str, int]:
    vocab = json.loads((TOKENIZER_FROM / "tokenizer.json").read_text())
    return {t["content"]: t["id"] for t in vocab["added_tokens"]}


def random_dream_config(**overrides) -> DreamConfig:
    """Tiny Qwen2-shaped config with the bundled tokenizer's special ids (GQA 4:2 by default)."""
    shape = small_qwen_shape(TOKENIZER_FROM, "<|mask|>", **overrides)
    shape.pop("head_dim")  # Qwen2 derives it from hidden_size / num_attention_heads
    return DreamConfig(**shape)


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
