"""Builders for LLaDA2 test checkpoints (LLaDA2MoeModelLM format) with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dllm_serve.models.llada2 import LLaDA2Config, LLaDA2Model, llada2_config_dict
from dllm_serve.models.moe import MoEConfig
from tests.helpers import random_like, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_LLADA2 = REPO / "models" / "tiny-llada2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def random_llada2_config(moe: dict | None = None, **overrides) -> LLaDA2Config:
    """Tiny LLaDA2 shapes with the bundled tokenizer's ids: a dense first layer, then 8 experts in 4
    groups of which 2 are kept, top-2, one shared expert; GQA 4:2, half the head rotated."""
    tok = json.loads((TINY_LLADA2 / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    moe_cfg = dict(
        hidden_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        moe_intermediate_size=32,
        num_shared_experts=1,
    )
    moe_cfg.update(moe or {})
    base = dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        vocab_size=len(tok["model"]["vocab"]),
        moe=MoEConfig(**moe_cfg),
        first_k_dense_replace=1,
        mask_token_id=ids["<|mask|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        rms_norm_eps=1e-6,
        rope_theta=600000.0,
        partial_rotary_factor=0.5,
        max_position_embeddings=256,
        use_qkv_bias=False,
        use_bias=False,
    )
    base.update(overrides)
    return LLaDA2Config(**base)


def random_llada2_weights(cfg: LLaDA2Config, seed: int = 0, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Published-name tensors of a random LLaDA2; expert biases spread so they change the routing."""
    w = random_like(LLaDA2Model(cfg).export_state_dict(), seed, scale, norm_jitter=0.2)
    gen = torch.Generator().manual_seed(seed + 1)
    for name in w:
        if name.endswith("gate.expert_bias"):
            w[name] = 0.3 * torch.randn(w[name].shape, generator=gen)
    return w


def write_llada2_checkpoint(
    directory: Path, cfg: LLaDA2Config, tensors: dict[str, torch.Tensor], *, shards: int = 1
) -> Path:
    """A checkpoint directory in the published layout, with the bundled tokenizer and chat template."""
    config = llada2_config_dict(cfg)
    return write_checkpoint(directory, config, TINY_LLADA2, TOKENIZER_FILES, tensors, shards=shards)
