"""Native SDAR block-diffusion LM (JetLM ``SDARForCausalLM``, and Gen-Verse's TraDo) in plain PyTorch.

SDAR is Qwen3 trained to denoise blocks of ``block_size`` (4) tokens: the network, its config keys
and its tensor names are Qwen3's (``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj``
without bias, per-head ``q_norm``/``k_norm`` before rotate-half RoPE, SwiGLU ``mlp``, ``model.norm``,
``lm_head``); what makes it a diffusion model is the attention mask and the mask token
(``mask_token_id`` in config.json, 151669 = ``<|MASK|>`` in the published checkpoints). Blocks sit
at absolute positions (0-3, 4-7, ...), the prompt included; each block attends to itself and to every
block before it. The engine's ``aligned`` cache policy builds exactly that mask, so this module
is a config class and a weight-name map (docs/sdar.md has the provenance of each fact).

The MoE variant (``SDARMoeForCausalLM``, SDAR-30B-A3B) is ``models/sdar_moe.py``: the same stack,
parsed by ``stack_fields``, with Qwen3-MoE expert layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dllm_serve.models.base import DiffusionLM, llama_style_names
from dllm_serve.models.config_checks import llama_style_problems, qwen3_stack_fields, refuse
from dllm_serve.models.family import CHATML_TEMPLATE, FamilySpec, ModelShape, TinyFormat, TinyShape
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
        if raw.get("num_experts"):
            raise ValueError(
                f"config.json has model_type {raw.get('model_type')!r} (dense SDAR) but num_experts="
                f"{raw.get('num_experts')}: an SDAR mixture-of-experts checkpoint (SDAR-30B-A3B) has "
                f"model_type {MOE_MODEL_TYPE!r} and architecture SDARMoeForCausalLM"
            )
        return cls(**stack_fields(raw, "SDAR"))


def stack_fields(raw: dict[str, Any], title: str) -> dict[str, Any]:
    """SDARConfig's fields from config.json, shared by the dense and the MoE variant (the same
    Qwen3 attention stack, blocks and special tokens); unsupported options are ValueErrors."""
    refuse(title, llama_style_problems(raw))
    block = raw.get("block_size") or 4
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"config.json block_size must be a positive integer, got {block!r}")
    return {**qwen3_stack_fields(raw, max_positions=32768), "block_size": block}


# Internal parameter -> published tensor name(s): the Llama/Qwen layout (models/base.py).
WEIGHT_NAMES = llama_style_names(PREFIX, HEAD)


class SDARModel(DiffusionLM):
    """Qwen3 stack whose attention pattern (block-causal, blocks of ``block_size``) the engine sets."""

    weight_names = WEIGHT_NAMES
    title = "SDAR"

    def __init__(self, cfg: SDARConfig, eot_token_id: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.build_stack(cfg, eot_token_id, qk_norm=True)


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


def decode_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's block size as the requests' default ``block_length``."""
    return {"block_length": SDARConfig.from_dict(config).block_size}


def cost_shape(config: dict[str, Any]) -> ModelShape:
    """The benchmark's shape, parsed by SDARConfig so defaults (KV heads, head_dim) match."""
    return ModelShape.of_dense_stack(SDARConfig.from_dict(config))


def tiny_config(shape: TinyShape) -> dict[str, Any]:
    """config.json of the bundled tiny-sdar (scripts/train_tiny.py)."""
    cfg = SDARConfig(
        **shape.qwen_fields(),
        head_dim=shape.d_model // shape.heads,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        block_size=shape.block_size,
    )
    return sdar_config_dict(cfg)


# SDAR's Qwen3 tokenizer: Qwen's special tokens plus the added mask token <|MASK|> (151669 published).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>")

SPEC = FamilySpec(
    name="sdar",
    title="SDAR",
    model_types=(MODEL_TYPE,),
    architectures=("sdar",),
    build=build,
    attention="aligned_block_causal",
    default_preset="sdar",
    cost_shape=cost_shape,
    decode_defaults=decode_defaults,
    tiny=TinyFormat(
        specials=SPECIAL_TOKENS,
        eos="<|endoftext|>",
        eot="<|im_end|>",
        mask="<|MASK|>",
        tokenizer_config={
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "mask_token": "<|MASK|>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "add_prefix_space": False,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
            "chat_template": CHATML_TEMPLATE,
        },
        special_tokens_map={
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "mask_token": "<|MASK|>",
        },
        config=tiny_config,
        objective="aligned_block_diffusion",
        # Block-causal: what follows the answer never reaches it, so short canvases suffice.
        canvas_lengths=(32, 48, 32, 64),
        default_kv_heads=2,
        generation_eos_both=True,
        block_size=4,
    ),
)
