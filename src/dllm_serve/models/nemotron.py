"""Native Nemotron diffusion LM (``DiffEncoderModel`` / ``NVRDiffConfig``) in plain PyTorch.

The published checkpoint is a Qwen3 decoder stack used as a (bidirectional or block-causal)
encoder, ``encoder.*``, plus a linear ``diffusion_head`` (hidden -> vocab, no bias). Attention is
Qwen3's: grouped-query, per-head RMSNorm on queries and keys before rotate-half RoPE. Q/K/V and the
gate/up pair are fused at load, like ``llada.py``; ``export_state_dict`` writes the official names
back (that is how ``scripts/train_tiny.py --family nemotron`` saves the bundled checkpoint).

Which keys each query sees is decided by the caller's attention mask (the engine's committed-
context plan), so one forward serves every ``dlm_paradigm`` that decodes by blocks; the paradigm
is validated here because an ``autoregressive`` checkpoint is not a diffusion model at all.
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
from dllm_serve.models.tokenizer import ChatTokenizer

ENCODER = "encoder."
HEAD = "diffusion_head.weight"
# Paradigms whose checkpoints decode block by block over a committed context (see docs/nemotron.md).
BLOCK_PARADIGMS = ("bidirectional", "prefix_bidirectional", "block_diff", "efficient_block_diff")
MODEL_TYPE = "nvrdiff"
ARCHITECTURE = "DiffEncoderModel"


@dataclass(frozen=True)
class NemotronConfig:
    """The subset of NVRDiffConfig (config.json) that defines the network and its special tokens."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
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
    qk_norm: bool = True
    dlm_paradigm: str = "bidirectional"
    block_size: int = 32
    shift_logits: bool = False

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NemotronConfig:
        """Parse config.json; options the native model does not implement are errors, not ignored."""
        archs = " ".join(raw.get("architectures") or []).lower()
        if "ministral" in archs or "labsdiffusion" in archs or raw.get("rope_parameters"):
            raise ValueError(
                f"{raw.get('architectures')} is a Nemotron-Labs-Diffusion config; it is read by "
                "models/nemotron_labs.py, not as a DiffEncoderModel"
            )
        paradigm = raw.get("dlm_paradigm", "bidirectional")
        if paradigm not in BLOCK_PARADIGMS:
            raise ValueError(
                f"dlm_paradigm {paradigm!r} is not served natively "
                f"(supported: {', '.join(BLOCK_PARADIGMS)}); "
                "use --trust-remote-code to run the checkpoint's own generate()"
            )
        problems = []
        if raw.get("attention_bias"):
            problems.append("attention_bias=true")
        if raw.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={raw.get('hidden_act')!r}")
        scaling = raw.get("rope_scaling")
        if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
            problems.append(f"rope_scaling={scaling!r}")
        if raw.get("use_sliding_window"):
            problems.append("use_sliding_window=true")
        if problems:
            raise ValueError(
                f"Nemotron config options not supported by the native model: {problems}; "
                "use --trust-remote-code to run the checkpoint's own code"
            )
        if raw.get("mask_token_id") is None:
            raise ValueError(
                "config.json has no mask_token_id; a diffusion checkpoint must name its mask token"
            )
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if eos is None:
            raise ValueError("config.json has no eos_token_id")
        pad = raw.get("pad_token_id")
        heads = raw["num_attention_heads"]
        return cls(
            hidden_size=raw["hidden_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            intermediate_size=raw["intermediate_size"],
            vocab_size=raw["vocab_size"],
            rope_theta=float(raw.get("rope_theta", 1_000_000.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            mask_token_id=int(raw["mask_token_id"]),
            eos_token_id=int(eos),
            pad_token_id=int(pad) if pad is not None else int(eos),
            bos_token_id=raw.get("bos_token_id"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qk_norm=not raw.get("disable_qk_norm", False),
            dlm_paradigm=paradigm,
            block_size=int(raw.get("block_size") or 32),
            shift_logits=bool(raw.get("shift_logits", False)),
        )


class NemotronModel(DiffusionLM):
    """Qwen3 stack as a diffusion denoiser; logits come from ``diffusion_head`` (or the tied embedding)."""

    def __init__(self, cfg: NemotronConfig, eot_token_id: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.roles = TokenRoles.from_ids(cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, eot_token_id)
        self.vocab_size = cfg.vocab_size
        self.max_length = cfg.max_position_embeddings
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        # Decoding defaults the checkpoint implies (DecodeParams field names), for resolve_params.
        self.decode_defaults: dict[str, Any] = {
            "block_length": cfg.block_size,
            "shift_logits": cfg.shift_logits,
        }
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(
                cfg.hidden_size,
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim,
                cfg.intermediate_size,
                cfg.rms_norm_eps,
                qk_norm=cfg.qk_norm,
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
            self.embed.weight.copy_(take(ENCODER + "embed_tokens.weight"))
            self.norm.copy_(take(ENCODER + "norm.weight"))
            if self.head is not None:
                self.head.weight.copy_(take(HEAD))
            elif HEAD in tensors:  # tied checkpoints may still store the (identical) head
                used.add(HEAD)
            for i, layer in enumerate(self.layers):
                p = f"{ENCODER}layers.{i}."
                a = p + "self_attn."
                layer.attn_norm.copy_(take(p + "input_layernorm.weight"))
                layer.mlp_norm.copy_(take(p + "post_attention_layernorm.weight"))
                if layer.q_norm is not None:
                    layer.q_norm.copy_(take(a + "q_norm.weight"))
                    layer.k_norm.copy_(take(a + "k_norm.weight"))
                layer.qkv.weight.copy_(
                    torch.cat(
                        [take(a + "q_proj.weight"), take(a + "k_proj.weight"), take(a + "v_proj.weight")]
                    )
                )
                layer.o_proj.weight.copy_(take(a + "o_proj.weight"))
                layer.gate_up.weight.copy_(
                    torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
                )
                layer.down.weight.copy_(take(p + "mlp.down_proj.weight"))
        unexpected = sorted(set(tensors) - used)
        if unexpected:
            raise KeyError(f"checkpoint has tensors the Nemotron model does not use: {unexpected[:5]}")

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the published names (un-fused, contiguous copies)."""
        cfg = self.cfg
        hd = cfg.head_dim
        out: dict[str, torch.Tensor] = {
            ENCODER + "embed_tokens.weight": self.embed.weight,
            ENCODER + "norm.weight": self.norm,
        }
        if self.head is not None:
            out[HEAD] = self.head.weight
        for i, layer in enumerate(self.layers):
            p = f"{ENCODER}layers.{i}."
            a = p + "self_attn."
            q, k, v = layer.qkv.weight.split(
                [cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.num_key_value_heads * hd]
            )
            gate, up = layer.gate_up.weight.chunk(2)
            out.update(
                {
                    p + "input_layernorm.weight": layer.attn_norm,
                    p + "post_attention_layernorm.weight": layer.mlp_norm,
                    a + "q_proj.weight": q,
                    a + "k_proj.weight": k,
                    a + "v_proj.weight": v,
                    a + "o_proj.weight": layer.o_proj.weight,
                    p + "mlp.gate_proj.weight": gate,
                    p + "mlp.up_proj.weight": up,
                    p + "mlp.down_proj.weight": layer.down.weight,
                }
            )
            if layer.q_norm is not None:
                out[a + "q_norm.weight"] = layer.q_norm
                out[a + "k_norm.weight"] = layer.k_norm
        return {k: v.detach().contiguous().clone() for k, v in out.items()}


def build(config: dict[str, Any], tokenizer: ChatTokenizer) -> DiffusionLM:
    """The loader's entry point: config.json as a dict and the checkpoint's tokenizer."""
    return NemotronModel(NemotronConfig.from_dict(config), eot_token_id=tokenizer.end_of_turn_id)


def nemotron_config_dict(cfg: NemotronConfig) -> dict[str, Any]:
    """config.json content in the published format (NVRDiffConfig keys, DiffEncoderModel)."""
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "disable_qk_norm": not cfg.qk_norm,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "mask_token_id": cfg.mask_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "dlm_paradigm": cfg.dlm_paradigm,
        "dlm_arch": "encoder",
        "block_size": cfg.block_size,
        "shift_logits": cfg.shift_logits,
        "torch_dtype": "float32",
    }
    if cfg.bos_token_id is not None:
        out["bos_token_id"] = cfg.bos_token_id
    return out
