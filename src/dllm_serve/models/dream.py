"""Native Dream (Dream-org/Dream-v0-Instruct-7B, Dream-Coder, apple/DiffuCoder) in plain PyTorch.

Dream is Qwen2.5's transformer used without a causal mask (``model_type`` ``Dream``,
``DreamModel``): grouped-query attention whose q/k/v projections carry a bias (o_proj does not),
rotate-half RoPE, RMSNorm, SwiGLU, an untied ``lm_head``. Its logits are *shifted*: the output at
position i predicts token i + 1, so the engine reads position p's logits from p - 1
(the spec's ``shift_logits``). Tensor names are the checkpoint's (``model.layers.N.self_attn.q_proj``
...); Q/K/V (weights and biases) and gate/up are fused at load, as in the other families.

Facts (config keys and defaults, tensor names, biases, the shift) come from the published
``configuration_dream.py`` / ``modeling_dream.py`` / ``generation_utils.py``; docs/dream.md says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dllm_serve.models.base import DiffusionLM, llama_style_names
from dllm_serve.models.config_checks import first_eos, llama_style_problems, refuse
from dllm_serve.models.family import FamilySpec, ModelShape, TinyFormat, TinyShape
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
        refuse("Dream", llama_style_problems(raw, attention_bias=False))  # q/k/v biases are Qwen2's
        eos = first_eos(raw)
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


# Internal parameter -> published tensor name(s): the Llama/Qwen layout (models/base.py).
WEIGHT_NAMES = llama_style_names(PREFIX, HEAD)


class DreamModel(DiffusionLM):
    """Qwen2 stack without a causal mask; logits from ``lm_head`` (or the tied embedding), shifted."""

    weight_names = WEIGHT_NAMES
    title = "Dream"

    def __init__(self, cfg: DreamConfig, eot_token_id: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.build_stack(cfg, eot_token_id, qk_norm=False, qkv_bias=True)


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


def cost_shape(config: dict[str, Any]) -> ModelShape:
    """The benchmark's shape, parsed by DreamConfig so defaults (KV heads) match."""
    return ModelShape.of_dense_stack(DreamConfig.from_dict(config), attention_bias=True)


def tiny_config(shape: TinyShape) -> dict[str, Any]:
    """config.json of the bundled tiny-dream (scripts/train_tiny.py)."""
    cfg = DreamConfig(
        **shape.qwen_fields(),
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
    )
    return dream_config_dict(cfg)


# Dream's special tokens by string (151643, 151644, 151645, 151666 in the 7B vocabulary).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>")
# Qwen2.5's ChatML as Dream-Instruct uses it: Qwen's default system message when none is given.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | map(attribute='text') | join('') %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + text + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

SPEC = FamilySpec(
    name="dream",
    title="Dream",
    model_types=(MODEL_TYPE.lower(),),
    architectures=("dreammodel",),
    build=build,
    attention="full",
    default_preset="dinfer_blockwise",
    cost_shape=cost_shape,
    shift_logits=True,  # generation_utils.py: logits = cat(logits[:, :1], logits[:, :-1])
    tiny=TinyFormat(
        specials=SPECIAL_TOKENS,
        eos="<|endoftext|>",
        eot="<|im_end|>",
        mask="<|mask|>",
        tokenizer_config={
            # Dream itself ships Qwen2's BPE as remote code ("DreamTokenizer": vocab.json + merges.txt,
            # read natively as Qwen2's tokenizer). Qwen2's pre-tokenizer splits every digit, which would
            # push the task suite's longest answers past a 32-token canvas, so the tiny model keeps a
            # tokenizer.json (docs/dream.md).
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "mask_token": "<|mask|>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
        special_tokens_map={
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "mask_token": "<|mask|>",
        },
        config=tiny_config,
        objective="masked_diffusion",
        # Full attention over the whole canvas, like LLaDA: every max_tokens a client may ask for.
        canvas_lengths=(32, 64, 48, 96, 128, 256, 64, 512, 160, 384, 48, 192),
        default_kv_heads=2,
    ),
)
