"""Native Nemotron diffusion LM (``DiffEncoderModel`` / ``NVRDiffConfig``) in plain PyTorch.

The published checkpoint is a Qwen3 decoder stack used as a (bidirectional or block-causal)
encoder, ``encoder.*``, plus a linear ``diffusion_head`` (hidden -> vocab, no bias). Attention is
Qwen3's: grouped-query, per-head RMSNorm on queries and keys before rotate-half RoPE. Q/K/V and the
gate/up pair are fused at load, like ``llada.py``; ``WEIGHT_NAMES`` maps them to the published names
(``export_state_dict`` writes them back: that is how ``scripts/train_tiny.py --family nemotron``
saves the bundled checkpoint). ``SPEC`` registers the family (models/registry.py).

Which keys each query sees is decided by the caller's attention mask (the engine's committed-
context plan), so one forward serves every ``dlm_paradigm`` that decodes by blocks; the paradigm
is validated here because an ``autoregressive`` checkpoint is not a diffusion model at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dllm_serve.models.base import DiffusionLM, llama_style_names
from dllm_serve.models.config_checks import llama_style_problems, qwen3_stack_fields, refuse
from dllm_serve.models.family import CHATML_TEMPLATE, FamilySpec, ModelShape, TinyFormat, TinyShape
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
                f"{raw.get('architectures')} is a Ministral-based Nemotron-Labs config, not a "
                "DiffEncoderModel: the native model for it is models/nemotron_labs.py (model_type "
                "nemotron_labs_diffusion); otherwise use --trust-remote-code"
            )
        paradigm = raw.get("dlm_paradigm", "bidirectional")
        if paradigm not in BLOCK_PARADIGMS:
            raise ValueError(
                f"dlm_paradigm {paradigm!r} is not served natively "
                f"(supported: {', '.join(BLOCK_PARADIGMS)}); "
                "use --trust-remote-code to run the checkpoint's own generate()"
            )
        refuse("Nemotron", llama_style_problems(raw))
        return cls(
            **qwen3_stack_fields(raw, max_positions=4096),
            qk_norm=not raw.get("disable_qk_norm", False),
            dlm_paradigm=paradigm,
            block_size=int(raw.get("block_size") or 32),
            shift_logits=bool(raw.get("shift_logits", False)),
        )


# Internal parameter -> published tensor name(s): the Llama/Qwen layout (models/base.py).
WEIGHT_NAMES = llama_style_names(ENCODER, HEAD)


class NemotronModel(DiffusionLM):
    """Qwen3 stack as a diffusion denoiser; logits come from ``diffusion_head`` (or the tied embedding)."""

    weight_names = WEIGHT_NAMES
    title = "Nemotron"

    def __init__(self, cfg: NemotronConfig, eot_token_id: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.build_stack(cfg, eot_token_id, qk_norm=cfg.qk_norm)


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


def decode_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's block size and logits shift, as DecodeParams fields (block_length, shift_logits)."""
    cfg = NemotronConfig.from_dict(config)
    return {"block_length": cfg.block_size, "shift_logits": cfg.shift_logits}


def cost_shape(config: dict[str, Any]) -> ModelShape:
    """The benchmark's shape, parsed by NemotronConfig so defaults (KV heads, head_dim) match."""
    return ModelShape.of_dense_stack(NemotronConfig.from_dict(config))


def tiny_config(shape: TinyShape) -> dict[str, Any]:
    """config.json of the bundled tiny-nemotron (scripts/train_tiny.py)."""
    cfg = NemotronConfig(
        **shape.qwen_fields(),
        head_dim=shape.d_model // shape.heads,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        dlm_paradigm="block_diff",
        block_size=shape.block_size,
    )
    return nemotron_config_dict(cfg)


SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>")

SPEC = FamilySpec(
    name="nemotron",
    title="Nemotron diffusion",
    model_types=(MODEL_TYPE, "nemotron_diffusion"),
    architectures=("diffencoder",),
    build=build,
    attention="block_causal",
    default_preset="nemotron",
    cost_shape=cost_shape,
    decode_defaults=decode_defaults,
    remote_code=True,
    tiny=TinyFormat(
        specials=SPECIAL_TOKENS,
        eos="<|endoftext|>",
        eot="<|im_end|>",
        mask="<|mask|>",
        tokenizer_config={
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "mask_token": "<|mask|>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "add_prefix_space": False,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
            "chat_template": CHATML_TEMPLATE,
        },
        special_tokens_map={
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "mask_token": "<|mask|>",
        },
        config=tiny_config,
        objective="block_diffusion",
        # Nemotron decodes block by block behind committed blocks only, so the canvas after the
        # answer never reaches it: short canvases suffice.
        canvas_lengths=(32, 48, 32, 64),
        default_kv_heads=2,
        generation_eos_both=True,
    ),
)
