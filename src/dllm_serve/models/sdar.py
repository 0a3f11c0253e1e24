"""Native SDAR block-diffusion LM (JetLM ``SDARForCausalLM``, and Gen-Verse's TraDo) in plain PyTorch.

SDAR is Qwen3 trained to denoise blocks of ``block_size`` (4) tokens: the network, its config keys
and its tensor names are Qwen3's (``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj``
without bias, per-head ``q_norm``/``k_norm`` before rotate-half RoPE, SwiGLU ``mlp``, ``model.norm``,
``lm_head``); what makes it a diffusion model is the attention mask and the mask token
(``mask_token_id`` in config.json, 151669 = ``<|MASK|>`` in the published checkpoints). Blocks sit
at absolute positions (0-3, 4-7, ...), the prompt included; each block attends to itself and to every
block before it. The engine's ``block_causal`` cache policy builds exactly that mask, so this module
is a config class and a weight-name map (docs/sdar.md has the provenance of each fact).

The MoE variant (``SDARMoeForCausalLM``, SDAR-30B-A3B) is recognised and refused with a clear message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dllm_serve.models.base import DecoderLayer, DiffusionLM, RotaryEmbedding, TokenRoles
from dllm_serve.models.tokenizer import ChatTokenizer

MODEL_TYPE = "sdar"
ARCHITECTURE = "SDARForCausalLM"
MOE_MODEL_TYPE = "sdar_moe"
PREFIX = "model."
HEAD = "lm_head.weight"


@dataclass(frozen=True)
class SDARConfig:
    """The subset of SDARConfig (config.json) that defines the network, its blocks and special tokens."""

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
    block_size: int = 4

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SDARConfig:
        """Parse config.json; options the native model does not implement are errors, not ignored."""
        archs = " ".join(raw.get("architectures") or []).lower()
        if raw.get("model_type") == MOE_MODEL_TYPE or "moe" in archs or raw.get("num_experts"):
            raise ValueError(
                f"{raw.get('architectures')} (SDAR mixture-of-experts, e.g. SDAR-30B-A3B) is not served "
                "natively yet; use --trust-remote-code to run the checkpoint's own code"
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
                f"SDAR config options not supported by the native model: {problems}; "
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
        block = raw.get("block_size") or 4
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"config.json block_size must be a positive integer, got {block!r}")
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
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            mask_token_id=int(raw["mask_token_id"]),
            eos_token_id=int(eos),
            pad_token_id=int(pad) if pad is not None else int(eos),
            bos_token_id=raw.get("bos_token_id"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            block_size=block,
        )


class SDARModel(DiffusionLM):
    """Qwen3 stack whose attention pattern (block-causal, blocks of ``block_size``) the engine sets."""

    def __init__(self, cfg: SDARConfig, eot_token_id: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.roles = TokenRoles.from_ids(cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, eot_token_id)
        self.vocab_size = cfg.vocab_size
        self.max_length = cfg.max_position_embeddings
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        # The checkpoint's block length is the default of every request (DecodeParams field name).
        self.decode_defaults: dict[str, Any] = {"block_length": cfg.block_size}
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(
                cfg.hidden_size,
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim,
                cfg.intermediate_size,
                cfg.rms_norm_eps,
                qk_norm=True,
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

    def _layer_names(self, i: int) -> dict[str, str]:
        """Official tensor name -> role, for layer ``i`` (roles are the fused module's pieces)."""
        p = f"{PREFIX}layers.{i}."
        a = p + "self_attn."
        return {
            p + "input_layernorm.weight": "attn_norm",
            p + "post_attention_layernorm.weight": "mlp_norm",
            a + "q_norm.weight": "q_norm",
            a + "k_norm.weight": "k_norm",
            a + "q_proj.weight": "q",
            a + "k_proj.weight": "k",
            a + "v_proj.weight": "v",
            a + "o_proj.weight": "o_proj",
            p + "mlp.gate_proj.weight": "gate",
            p + "mlp.up_proj.weight": "up",
            p + "mlp.down_proj.weight": "down",
        }

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
                got = {role: take(name) for name, role in self._layer_names(i).items()}
                layer.attn_norm.copy_(got["attn_norm"])
                layer.mlp_norm.copy_(got["mlp_norm"])
                layer.q_norm.copy_(got["q_norm"])
                layer.k_norm.copy_(got["k_norm"])
                layer.qkv.weight.copy_(torch.cat([got["q"], got["k"], got["v"]]))
                layer.o_proj.weight.copy_(got["o_proj"])
                layer.gate_up.weight.copy_(torch.cat([got["gate"], got["up"]]))
                layer.down.weight.copy_(got["down"])
        unexpected = sorted(set(tensors) - used)
        if unexpected:
            raise KeyError(f"checkpoint has tensors the SDAR model does not use: {unexpected[:5]}")

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the published names (un-fused, contiguous copies)."""
        cfg = self.cfg
        hd = cfg.head_dim
        out: dict[str, torch.Tensor] = {
            PREFIX + "embed_tokens.weight": self.embed.weight,
            PREFIX + "norm.weight": self.norm,
        }
        if self.head is not None:
            out[HEAD] = self.head.weight
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv.weight.split(
                [cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.num_key_value_heads * hd]
            )
            gate, up = layer.gate_up.weight.chunk(2)
            pieces = {
                "attn_norm": layer.attn_norm,
                "mlp_norm": layer.mlp_norm,
                "q_norm": layer.q_norm,
                "k_norm": layer.k_norm,
                "q": q,
                "k": k,
                "v": v,
                "o_proj": layer.o_proj.weight,
                "gate": gate,
                "up": up,
                "down": layer.down.weight,
            }
            out.update({name: pieces[role] for name, role in self._layer_names(i).items()})
        return {k: v.detach().contiguous().clone() for k, v in out.items()}


def build(config: dict[str, Any], tokenizer: ChatTokenizer) -> DiffusionLM:
    """The loader's entry point: config.json as a dict and the checkpoint's tokenizer."""
    return SDARModel(SDARConfig.from_dict(config), eot_token_id=tokenizer.end_of_turn_id)


def sdar_config_dict(cfg: SDARConfig) -> dict[str, Any]:
    """config.json content in the published format (SDARConfig keys, SDARForCausalLM).

    The published files also carry ``auto_map`` (their modeling code); a bundled checkpoint ships no
    code, so it leaves ``auto_map`` out."""
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "block_size": cfg.block_size,
        "mask_token_id": cfg.mask_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": cfg.rope_theta,
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "float32",
        "vocab_size": cfg.vocab_size,
    }
    if cfg.bos_token_id is not None:
        out["bos_token_id"] = cfg.bos_token_id
    return out
