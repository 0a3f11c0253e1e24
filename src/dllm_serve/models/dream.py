"""Native Dream (Dream-org/Dream-v0-Instruct-7B, Dream-Coder, apple/DiffuCoder) in plain PyTorch.

Dream is Qwen2.5's transformer used without a causal mask (``model_type`` ``Dream``,
``DreamModel``): grouped-query attention whose q/k/v projections carry a bias (o_proj does not),
rotate-half RoPE, RMSNorm, SwiGLU, an untied ``lm_head``. Its logits are *shifted*: the output at
position i predicts token i + 1, so the engine reads position p's logits from p - 1
(``decode_defaults['shift_logits']``). Tensor names are the checkpoint's (``model.layers.N.self_attn.q_proj``
...); Q/K/V (weights and biases) and gate/up are fused at load, as in the other families.

Facts (config keys and defaults, tensor names, biases, the shift) come from the published
``configuration_dream.py`` / ``modeling_dream.py`` / ``generation_utils.py``; docs/dream.md says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dllm_serve.models.base import DecoderLayer, DiffusionLM, RotaryEmbedding, TokenRoles
from dllm_serve.models.tokenizer import ChatTokenizer

MODEL_TYPE = "Dream"
ARCHITECTURE = "DreamModel"
PREFIX = "model."
HEAD = "lm_head.weight"
# DreamConfig's own defaults for the special tokens (configuration_dream.py).
DEFAULT_MASK_TOKEN_ID = 151666
DEFAULT_PAD_TOKEN_ID = 151643


@dataclass(frozen=True)
class DreamConfig:
    """The subset of DreamConfig (config.json) that defines the network and its special tokens."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    bos_token_id: int | None = None
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DreamConfig:
        """Parse config.json; options the native model does not implement are errors, not ignored."""
        problems = []
        if raw.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={raw.get('hidden_act')!r}")
        scaling = raw.get("rope_scaling")
        if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
            problems.append(f"rope_scaling={scaling!r}")
        if raw.get("use_sliding_window"):
            problems.append("use_sliding_window=true")
        if problems:
            raise ValueError(
                f"Dream config options not supported by the native model: {problems}; "
                "use --trust-remote-code to run the checkpoint's own code"
            )
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        pad = raw.get("pad_token_id", DEFAULT_PAD_TOKEN_ID)
        heads = raw["num_attention_heads"]
        return cls(
            hidden_size=raw["hidden_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            intermediate_size=raw["intermediate_size"],
            vocab_size=raw["vocab_size"],
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            mask_token_id=int(raw.get("mask_token_id", DEFAULT_MASK_TOKEN_ID)),
            eos_token_id=int(eos if eos is not None else pad),
            pad_token_id=int(pad),
            bos_token_id=raw.get("bos_token_id"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )


class DreamModel(DiffusionLM):
    """Qwen2 stack without a causal mask; logits from ``lm_head`` (or the tied embedding), shifted."""

    def __init__(self, cfg: DreamConfig, eot_token_id: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.roles = TokenRoles.from_ids(cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, eot_token_id)
        self.vocab_size = cfg.vocab_size
        self.max_length = cfg.max_position_embeddings
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        # Dream's logits at position i predict token i + 1 (generation_utils.py shifts them right).
        self.decode_defaults: dict[str, Any] = {"shift_logits": True}
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(
                cfg.hidden_size,
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim,
                cfg.intermediate_size,
                cfg.rms_norm_eps,
                qk_norm=False,
                qkv_bias=True,
            )
            for _ in range(cfg.num_hidden_layers)
        )
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.norm_eps = cfg.rms_norm_eps

    # -- official checkpoint names ------------------------------------------------------------

    def load_official(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors named as in the published checkpoint into the fused modules."""
        used: set[str] = set()

        def take(key: str) -> torch.Tensor:
            if key not in tensors:
                raise KeyError(f"checkpoint is missing tensor {key!r}")
            used.add(key)
            return tensors[key]

        with torch.no_grad():
            self.embed.weight.copy_(take(PREFIX + "embed_tokens.weight"))
            self.norm.copy_(take(PREFIX + "norm.weight"))
            if self.head is not None:
                self.head.weight.copy_(take(HEAD))
            elif HEAD in tensors:  # tied checkpoints may still store the (identical) head
                used.add(HEAD)
            for i, layer in enumerate(self.layers):
                p = f"{PREFIX}layers.{i}."
                a = p + "self_attn."
                layer.attn_norm.copy_(take(p + "input_layernorm.weight"))
                layer.mlp_norm.copy_(take(p + "post_attention_layernorm.weight"))
                for kind in ("weight", "bias"):
                    fused = [take(f"{a}{proj}_proj.{kind}") for proj in ("q", "k", "v")]
                    getattr(layer.qkv, kind).copy_(torch.cat(fused))
                layer.o_proj.weight.copy_(take(a + "o_proj.weight"))
                layer.gate_up.weight.copy_(
                    torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
                )
                layer.down.weight.copy_(take(p + "mlp.down_proj.weight"))
        unexpected = sorted(set(tensors) - used)
        if unexpected:
            raise KeyError(f"checkpoint has tensors the Dream model does not use: {unexpected[:5]}")

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the published names (un-fused, contiguous copies)."""
        cfg = self.cfg
        hd = cfg.head_dim
        sizes = [cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.num_key_value_heads * hd]
        out: dict[str, torch.Tensor] = {
            PREFIX + "embed_tokens.weight": self.embed.weight,
            PREFIX + "norm.weight": self.norm,
        }
        if self.head is not None:
            out[HEAD] = self.head.weight
        for i, layer in enumerate(self.layers):
            p = f"{PREFIX}layers.{i}."
            a = p + "self_attn."
            for kind in ("weight", "bias"):
                parts = getattr(layer.qkv, kind).split(sizes)
                out.update({f"{a}{proj}_proj.{kind}": t for proj, t in zip("qkv", parts, strict=True)})
            gate, up = layer.gate_up.weight.chunk(2)
            out.update(
                {
                    p + "input_layernorm.weight": layer.attn_norm,
                    p + "post_attention_layernorm.weight": layer.mlp_norm,
                    a + "o_proj.weight": layer.o_proj.weight,
                    p + "mlp.gate_proj.weight": gate,
                    p + "mlp.up_proj.weight": up,
                    p + "mlp.down_proj.weight": layer.down.weight,
                }
            )
        return {k: v.detach().contiguous().clone() for k, v in out.items()}


def build(config: dict[str, Any], tokenizer: ChatTokenizer) -> DiffusionLM:
    """The loader's entry point: config.json as a dict and the checkpoint's tokenizer."""
    return DreamModel(DreamConfig.from_dict(config), eot_token_id=tokenizer.end_of_turn_id)


def dream_config_dict(cfg: DreamConfig) -> dict[str, Any]:
    """config.json content in the published format (DreamConfig keys, DreamModel)."""
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "mask_token_id": cfg.mask_token_id,
        "max_position_embeddings": cfg.max_position_embeddings,
        "max_window_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": cfg.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "float32",
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": cfg.vocab_size,
    }
    if cfg.bos_token_id is not None:
        out["bos_token_id"] = cfg.bos_token_id
    return out
