"""Native LLaDA (GSAI-ML/LLaDA-8B-Instruct, LLaDA-1.5) in plain PyTorch.

Reads the official config keys and safetensors names; projections are fused at load (QKV, and the
gate/up pair of the SwiGLU MLP) so a step launches fewer, larger matmuls. ``export_state_dict``
writes the official names back, which is how ``scripts/train_tiny.py`` saves its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dllm_serve.models.base import (
    DecoderLayer,
    DiffusionLM,
    RotaryEmbedding,
    TokenRoles,
)

PREFIX = "model.transformer."


@dataclass(frozen=True)
class LLaDAConfig:
    """The subset of LLaDA's config.json that defines the network."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden_size: int
    vocab_size: int
    embedding_size: int
    rope_theta: float
    rms_norm_eps: float
    max_sequence_length: int
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    weight_tying: bool = False
    include_bias: bool = False

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LLaDAConfig:
        unsupported = [k for k in ("attention_layer_norm", "scale_logits", "input_emb_norm") if raw.get(k)]
        if unsupported:
            raise ValueError(f"LLaDA config options not supported by the native model: {unsupported}")
        if raw.get("include_bias"):
            raise ValueError("LLaDA checkpoints with include_bias=true are not supported")
        n_kv = raw.get("n_kv_heads") or raw["n_heads"]
        return cls(
            d_model=raw["d_model"],
            n_layers=raw["n_layers"],
            n_heads=raw["n_heads"],
            n_kv_heads=n_kv,
            mlp_hidden_size=raw["mlp_hidden_size"],
            vocab_size=raw["vocab_size"],
            embedding_size=raw.get("embedding_size") or raw["vocab_size"],
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            max_sequence_length=raw.get("max_sequence_length", 4096),
            mask_token_id=raw["mask_token_id"],
            eos_token_id=raw["eos_token_id"],
            pad_token_id=raw.get("pad_token_id", raw["eos_token_id"]),
            weight_tying=bool(raw.get("weight_tying", False)),
            include_bias=False,
        )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class LLaDAModel(DiffusionLM):
    """LLaDA's masked-diffusion transformer: bidirectional attention, SwiGLU MLP, RMSNorm, RoPE."""

    def __init__(self, cfg: LLaDAConfig, eot_token_id: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.roles = TokenRoles.from_ids(cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, eot_token_id)
        self.vocab_size = cfg.vocab_size
        self.max_length = cfg.max_sequence_length
        self.num_layers = cfg.n_layers
        self.num_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.embed = nn.Embedding(cfg.embedding_size, cfg.d_model)
        self.layers = nn.ModuleList(
            DecoderLayer(
                cfg.d_model,
                cfg.n_heads,
                cfg.n_kv_heads,
                cfg.head_dim,
                cfg.mlp_hidden_size,
                cfg.rms_norm_eps,
                qk_norm=False,
            )
            for _ in range(cfg.n_layers)
        )
        self.norm = nn.Parameter(torch.ones(cfg.d_model))
        self.head = None if cfg.weight_tying else nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.norm_eps = cfg.rms_norm_eps

    # -- official checkpoint names ------------------------------------------------------------

    def load_official(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors named as in the official checkpoint into the fused modules."""
        cfg = self.cfg
        used: set[str] = set()

        def take(name: str) -> torch.Tensor:
            key = PREFIX + name
            if key not in tensors:
                raise KeyError(f"checkpoint is missing tensor {key!r}")
            used.add(key)
            return tensors[key]

        with torch.no_grad():
            self.embed.weight.copy_(take("wte.weight"))
            self.norm.copy_(take("ln_f.weight"))
            if self.head is not None:
                self.head.weight.copy_(take("ff_out.weight"))
            for i, blk in enumerate(self.layers):
                p = f"blocks.{i}."
                blk.attn_norm.copy_(take(p + "attn_norm.weight"))
                blk.mlp_norm.copy_(take(p + "ff_norm.weight"))
                blk.qkv.weight.copy_(
                    torch.cat(
                        [take(p + "q_proj.weight"), take(p + "k_proj.weight"), take(p + "v_proj.weight")]
                    )
                )
                blk.o_proj.weight.copy_(take(p + "attn_out.weight"))
                blk.gate_up.weight.copy_(torch.cat([take(p + "ff_proj.weight"), take(p + "up_proj.weight")]))
                blk.down.weight.copy_(take(p + "ff_out.weight"))
        unexpected = sorted(set(tensors) - used)
        if unexpected:
            raise KeyError(f"checkpoint has tensors the LLaDA model does not use: {unexpected[:5]}")
        del cfg

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights under the official LLaDA names (un-fused, contiguous copies)."""
        cfg = self.cfg
        hd = cfg.head_dim
        out: dict[str, torch.Tensor] = {
            PREFIX + "wte.weight": self.embed.weight,
            PREFIX + "ln_f.weight": self.norm,
        }
        if self.head is not None:
            out[PREFIX + "ff_out.weight"] = self.head.weight
        for i, blk in enumerate(self.layers):
            p = f"{PREFIX}blocks.{i}."
            q, k, v = blk.qkv.weight.split([cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd])
            gate, up = blk.gate_up.weight.chunk(2)
            out.update(
                {
                    p + "attn_norm.weight": blk.attn_norm,
                    p + "ff_norm.weight": blk.mlp_norm,
                    p + "q_proj.weight": q,
                    p + "k_proj.weight": k,
                    p + "v_proj.weight": v,
                    p + "attn_out.weight": blk.o_proj.weight,
                    p + "ff_proj.weight": gate,
                    p + "up_proj.weight": up,
                    p + "ff_out.weight": blk.down.weight,
                }
            )
        return {k: v.detach().contiguous().clone() for k, v in out.items()}


def llada_config_dict(cfg: LLaDAConfig) -> dict[str, Any]:
    """config.json content in LLaDA's own format (keys and model_type as the official release)."""
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "activation_type": "silu",
        "block_type": "llama",
        "layer_norm_type": "rms",
        "rope": True,
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "mlp_hidden_size": cfg.mlp_hidden_size,
        "vocab_size": cfg.vocab_size,
        "embedding_size": cfg.embedding_size,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_sequence_length": cfg.max_sequence_length,
        "mask_token_id": cfg.mask_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "weight_tying": cfg.weight_tying,
        "include_bias": cfg.include_bias,
        "torch_dtype": "float32",
    }
