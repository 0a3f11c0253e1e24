"""Native LLaDA (GSAI-ML/LLaDA-8B-Instruct, LLaDA-1.5) in plain PyTorch.

Reads the official config keys and safetensors names; projections are fused at load (QKV, and the
gate/up pair of the SwiGLU MLP) so a step launches fewer, larger matmuls. ``WEIGHT_NAMES`` is the
table from those fused parameters to the official names, which ``models/base.py`` loads and exports
(``export_state_dict`` is how ``scripts/train_tiny.py`` saves its checkpoint). ``SPEC`` registers
the family (models/registry.py).
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
    WeightNames,
)
from dllm_serve.models.family import FamilySpec, ModelShape, TinyFormat, TinyShape
from dllm_serve.models.tokenizer import ChatTokenizer

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
        problems = unsupported_options(raw)
        if problems:
            raise ValueError(
                f"LLaDA config options not supported by the native model: {', '.join(problems)} "
                "(it implements LLaDA-8B's architecture: RoPE, RMSNorm with weights and no bias, "
                "no biases, one block per layer)"
            )
        n_kv = raw.get("n_kv_heads") or (1 if raw.get("multi_query_attention") else raw["n_heads"])
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


# Options of LLaDA's (OLMo-derived) config whose value the native model supports, and that value;
# any other value is refused at load with the key named. Dropouts, init_* and precision only matter
# in training, rope_full_precision is what the native model does anyway (RoPE in float32), and
# flash_attention / use_cache select code paths of the published modeling file, not the math.
REQUIRED_VALUES: dict[str, Any] = {
    "alibi": False,
    "attention_layer_norm": False,
    "scale_logits": False,
    "input_emb_norm": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "bias_for_layer_norm": False,
    "layer_norm_with_affine": True,
    "layer_norm_type": "rms",
    "activation_type": "silu",
    "block_type": "llama",
    "block_group_size": 1,
    "rope": True,
}


def unsupported_options(raw: dict[str, Any]) -> list[str]:
    """``key=value`` for every option in ``raw`` the native model cannot run as written."""
    problems = [
        f"{key}={raw[key]!r}"
        for key, want in REQUIRED_VALUES.items()
        if raw.get(key) is not None and raw[key] != want
    ]
    if raw.get("multi_query_attention") and raw.get("n_kv_heads") not in (None, 1):
        problems.append(f"multi_query_attention=true with n_kv_heads={raw['n_kv_heads']}")
    return problems


# Internal parameter -> official tensor name(s) (models/base.py WeightNames); tuples are fused.
WEIGHT_NAMES = WeightNames(
    top={
        "embed.weight": PREFIX + "wte.weight",
        "norm": PREFIX + "ln_f.weight",
        "head.weight": PREFIX + "ff_out.weight",
    },
    layers={
        "attn_norm": PREFIX + "blocks.{i}.attn_norm.weight",
        "mlp_norm": PREFIX + "blocks.{i}.ff_norm.weight",
        "qkv.weight": tuple(PREFIX + f"blocks.{{i}}.{x}_proj.weight" for x in "qkv"),
        "o_proj.weight": PREFIX + "blocks.{i}.attn_out.weight",
        "gate_up.weight": (PREFIX + "blocks.{i}.ff_proj.weight", PREFIX + "blocks.{i}.up_proj.weight"),
        "down.weight": PREFIX + "blocks.{i}.ff_out.weight",
    },
)


class LLaDAModel(DiffusionLM):
    """LLaDA's masked-diffusion transformer: bidirectional attention, SwiGLU MLP, RMSNorm, RoPE."""

    weight_names = WEIGHT_NAMES
    title = "LLaDA"

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


def llada_config_dict(cfg: LLaDAConfig) -> dict[str, Any]:
    """config.json content in LLaDA's own format: every key of LLaDA-8B-Instruct's config.json, with
    the real values where they apply (models/configs/llada-8b-instruct/config.json) and the small
    model's where it differs (shapes, token ids, float32, its initialisation). ``auto_map`` is left
    out on purpose: it names modeling code shipped beside the weights, and none is shipped."""
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": cfg.d_model,
        "embedding_dropout": 0.0,
        "embedding_size": cfg.embedding_size,
        "eos_token_id": cfg.eos_token_id,
        "flash_attention": False,
        "include_bias": cfg.include_bias,
        "include_qkv_bias": False,
        # scripts/train_tiny.py: normal(0.02), residual output projections 0.02 / sqrt(2 n_layers)
        "init_cutoff_factor": None,
        "init_device": "cpu",
        "init_fn": "full_megatron",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": cfg.mask_token_id,
        "max_sequence_length": cfg.max_sequence_length,
        "mlp_hidden_size": cfg.mlp_hidden_size,
        "mlp_ratio": 4,  # as in LLaDA-8B; unused, since mlp_hidden_size is set
        "multi_query_attention": None,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "n_layers": cfg.n_layers,
        "pad_token_id": cfg.pad_token_id,
        "precision": "fp32",
        "residual_dropout": 0.0,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": cfg.rope_theta,
        "scale_logits": False,
        "torch_dtype": "float32",
        "use_cache": False,
        "vocab_size": cfg.vocab_size,
        "weight_tying": cfg.weight_tying,
    }


def build(config: dict[str, Any], tokenizer: ChatTokenizer) -> DiffusionLM:
    """The loader's entry point: config.json as a dict and the checkpoint's tokenizer."""
    return LLaDAModel(LLaDAConfig.from_dict(config), eot_token_id=tokenizer.end_of_turn_id)


def cost_shape(config: dict[str, Any]) -> ModelShape:
    """The benchmark's shape, parsed by LLaDAConfig so defaults (KV heads, padded embedding) match."""
    c = LLaDAConfig.from_dict(config)
    return ModelShape(
        d_model=c.d_model,
        n_layers=c.n_layers,
        n_heads=c.n_heads,
        n_kv_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        mlp_hidden=c.mlp_hidden_size,
        vocab_size=c.embedding_size,
        max_length=c.max_sequence_length,
    )


def tiny_config(shape: TinyShape) -> dict[str, Any]:
    """config.json of the bundled tiny-llada (scripts/train_tiny.py)."""
    cfg = LLaDAConfig(
        d_model=shape.d_model,
        n_layers=shape.layers,
        n_heads=shape.heads,
        n_kv_heads=shape.kv_heads,
        mlp_hidden_size=shape.mlp,
        vocab_size=shape.vocab_size,
        embedding_size=shape.vocab_size,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_sequence_length=shape.max_length,
        mask_token_id=shape.mask,
        eos_token_id=shape.eos,
        pad_token_id=shape.eos,
    )
    return llada_config_dict(cfg)


SPECIAL_TOKENS = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|mdm_mask|>",
)
# LLaDA-8B-Instruct's template: Llama-3 headers, bos on the first message, content trimmed.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | map(attribute='text') | join('') %}{% endif %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + text | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

SPEC = FamilySpec(
    name="llada",
    title="LLaDA",
    model_types=("llada",),
    architectures=("llada",),
    build=build,
    attention="full",
    default_preset="dinfer_blockwise",
    cost_shape=cost_shape,
    tiny=TinyFormat(
        specials=SPECIAL_TOKENS,
        eos="<|endoftext|>",
        eot="<|eot_id|>",
        mask="<|mdm_mask|>",
        tokenizer_config={
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "mask_token": "<|mdm_mask|>",
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
        special_tokens_map={
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
        },
        config=tiny_config,
        objective="masked_diffusion",
        # LLaDA attends over the whole canvas, so it must see every max_tokens a client may ask for
        # (32..512; trained on 32-96 only it answered nothing at 256).
        canvas_lengths=(32, 64, 48, 96, 128, 256, 64, 512, 160, 384, 48, 192),
    ),
)
