"""Native LLaDA2.x (inclusionAI LLaDA2.0/2.1 mini and flash, ``LLaDA2MoeModelLM``) in plain PyTorch.

A block-diffusion mixture-of-experts decoder (Ling-2.0's architecture used as a denoiser):
grouped-query attention with a fused ``query_key_value`` projection, per-head RMSNorm of q and k,
rotate-half RoPE on the first ``partial_rotary_factor`` of each head only; the first
``first_k_dense_replace`` layers have a dense SwiGLU MLP, the others a sparse MoE block
(``models/moe.py``: sigmoid router with an expert-bias correction, group-limited top-k, routed
plus shared experts). Config keys and tensor names are those of the published checkpoints (see
docs/llada2.md for where each fact comes from); ``export_state_dict`` writes them back.

Which keys a query sees is the caller's attention mask: the engine's block-aligned committed-
context plan reproduces the published block-causal mask (blocks of ``block_length`` counted from
position 0, the prompt included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dllm_serve.models.base import DiffusionLM, RotaryEmbedding, WeightNames
from dllm_serve.models.config_checks import first_eos, llama_style_problems, refuse
from dllm_serve.models.family import FamilySpec, ModelShape, TinyFormat, TinyShape
from dllm_serve.models.moe import MoEBlock, MoEConfig, SparseLayer, expert_weight_map, moe_of
from dllm_serve.models.tokenizer import ChatTokenizer

ARCHITECTURE = "LLaDA2MoeModelLM"
MODEL_TYPE = "llada2_moe"
PREFIX = "model."
HEAD = "lm_head.weight"
# Published generate() defaults (modeling_llada2_moe.py), used only when config.json and the
# tokenizer name no mask / EOS token.
GENERATE_MASK_ID = 156895
GENERATE_EOS_ID = 156892
BLOCK_LENGTH = 32


@dataclass(frozen=True)
class LLaDA2Config:
    """LLaDA2MoeConfig's keys that define the network, with the published class's defaults."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    moe: MoEConfig
    first_k_dense_replace: int
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    max_position_embeddings: int = 16384
    use_qkv_bias: bool = False
    use_bias: bool = True
    use_qk_norm: bool = True
    tie_word_embeddings: bool = False

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe(self, layer: int) -> bool:
        return self.moe.num_experts > 0 and layer >= self.first_k_dense_replace

    @classmethod
    def from_dict(cls, raw: dict[str, Any], mask: int | None = None, eos: int | None = None) -> LLaDA2Config:
        """Parse config.json; ``mask``/``eos`` are the tokenizer's ids, used when config.json has none.

        Options the native model does not implement are errors, not ignored.
        """
        problems = llama_style_problems(raw, attention_bias=False)  # use_qkv_bias is its own key
        if raw.get("score_function", "sigmoid") != "sigmoid":
            problems.append(f"score_function={raw.get('score_function')!r}")
        if raw.get("norm_head"):
            problems.append("norm_head=true")
        refuse("LLaDA2", problems)
        heads = raw.get("num_attention_heads", 16)
        hidden = raw.get("hidden_size", 1024)
        experts = raw.get("num_experts") or 0
        moe = MoEConfig(
            hidden_size=hidden,
            num_experts=experts,
            num_experts_per_tok=raw.get("num_experts_per_tok", 2),
            n_group=raw.get("n_group", 8) if experts else 1,
            topk_group=raw.get("topk_group", 4) if experts else 1,
            routed_scaling_factor=float(raw.get("routed_scaling_factor", 2.5)),
            moe_intermediate_size=raw.get("moe_intermediate_size") or 0,
            num_shared_experts=raw.get("num_shared_experts") or 0,
        )
        if experts:
            moe.validate()
        mask_id = raw.get("mask_token_id", mask if mask is not None else GENERATE_MASK_ID)
        eos_id = first_eos(raw)
        if eos_id is None:
            eos_id = eos if eos is not None else GENERATE_EOS_ID
        pad = raw.get("pad_token_id")
        return cls(
            hidden_size=hidden,
            num_hidden_layers=raw.get("num_hidden_layers", 24),
            num_attention_heads=heads,
            # LLaDA2.1's config class reads 0 as "as many as the query heads".
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            intermediate_size=raw.get("intermediate_size") or 0,
            vocab_size=raw.get("vocab_size", 30592),
            moe=moe,
            first_k_dense_replace=raw.get("first_k_dense_replace", 0),
            mask_token_id=int(mask_id),
            eos_token_id=int(eos_id),
            pad_token_id=int(pad) if pad is not None else int(eos_id),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            partial_rotary_factor=float(raw.get("partial_rotary_factor", 0.5)),
            max_position_embeddings=raw.get("max_position_embeddings", 16384),
            use_qkv_bias=bool(raw.get("use_qkv_bias", False)),
            use_bias=bool(raw.get("use_bias", True)),
            use_qk_norm=bool(raw.get("use_qk_norm", True)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )


class LLaDA2Layer(SparseLayer):
    """base.DecoderLayer (pre-RMSNorm GQA, q/k norm, partial RoPE through the model's rotary width,
    optional q/k/v and output biases) whose MLP is dense SwiGLU in the first
    ``first_k_dense_replace`` layers and a mixture of experts after them."""

    def __init__(self, cfg: LLaDA2Config, index: int) -> None:
        super().__init__(
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            cfg.rms_norm_eps,
            cfg.moe if cfg.is_moe(index) else None,
            qk_norm=cfg.use_qk_norm,
            qkv_bias=cfg.use_qkv_bias,
            o_bias=cfg.use_bias,
        )


_LAYER = PREFIX + "layers.{i}."
_ATTN = _LAYER + "attention."
# Internal parameter -> published tensor name(s) (models/base.py WeightNames); the routed experts'
# names depend on the expert count, so LLaDA2Model.weight_map adds them per layer.
WEIGHT_NAMES = WeightNames(
    top={
        "embed.weight": PREFIX + "word_embeddings.weight",
        "norm": PREFIX + "norm.weight",
        "head.weight": HEAD,
    },
    layers={
        "attn_norm": _LAYER + "input_layernorm.weight",
        "mlp_norm": _LAYER + "post_attention_layernorm.weight",
        "qkv.weight": _ATTN + "query_key_value.weight",
        "qkv.bias": _ATTN + "query_key_value.bias",
        "o_proj.weight": _ATTN + "dense.weight",
        "o_proj.bias": _ATTN + "dense.bias",
        "q_norm": _ATTN + "query_layernorm.weight",
        "k_norm": _ATTN + "key_layernorm.weight",
        "gate_up.weight": (_LAYER + "mlp.gate_proj.weight", _LAYER + "mlp.up_proj.weight"),
        "down.weight": _LAYER + "mlp.down_proj.weight",
    },
    optional=(HEAD,),  # tied checkpoints may still store the (identical) head
)


class LLaDA2Model(DiffusionLM):
    """``LLaDA2MoeModelLM``: word embeddings, LLaDA2 layers, final norm, ``lm_head``."""

    weight_names = WEIGHT_NAMES
    title = "LLaDA2"

    def __init__(self, cfg: LLaDA2Config, eot_token_id: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        # The published rotary embedding computes its frequencies over the rotated channels only.
        rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta)
        self.build_stack(cfg, eot_token_id, layer_at=lambda i: LLaDA2Layer(cfg, i), rotary=rotary)

    def moe_blocks(self) -> list[MoEBlock]:
        return [blk for blk in map(moe_of, self.layers) if blk is not None]

    def weight_map(self) -> dict[str, tuple[str, ...]]:
        """The table's names plus, per MoE layer, the router's and every expert's."""
        return expert_weight_map(self, self.weight_names, _LAYER + "mlp.")


def build(config: dict[str, Any], tokenizer: ChatTokenizer) -> DiffusionLM:
    """The loader's entry point: config.json as a dict and the checkpoint's tokenizer."""
    hf = tokenizer.hf
    cfg = LLaDA2Config.from_dict(config, mask=hf.mask_token_id, eos=hf.eos_token_id)
    return LLaDA2Model(cfg, eot_token_id=tokenizer.end_of_turn_id)


def llada2_config_dict(cfg: LLaDA2Config) -> dict[str, Any]:
    """config.json in the published format (LLaDA2MoeConfig keys, ``LLaDA2MoeModelLM``)."""
    moe = cfg.moe
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "partial_rotary_factor": cfg.partial_rotary_factor,
        "use_qkv_bias": cfg.use_qkv_bias,
        "use_bias": cfg.use_bias,
        "use_qk_norm": cfg.use_qk_norm,
        "norm_head": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "num_experts": moe.num_experts,
        "num_shared_experts": moe.num_shared_experts,
        "num_experts_per_tok": moe.num_experts_per_tok,
        "n_group": moe.n_group,
        "topk_group": moe.topk_group,
        "routed_scaling_factor": moe.routed_scaling_factor,
        "moe_intermediate_size": moe.moe_intermediate_size,
        "first_k_dense_replace": cfg.first_k_dense_replace,
        "score_function": "sigmoid",
        "norm_topk_prob": True,
        "moe_router_enable_expert_bias": True,
        "output_router_logits": False,
        "use_sliding_window": False,
        "embedding_dropout": 0.0,
        "attention_dropout": 0.0,
        "output_dropout": 0.0,
        "mask_token_id": cfg.mask_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
    }


def decode_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """LLaDA2's generate() decodes blocks of 32 (config.json names no block size)."""
    return {"block_length": BLOCK_LENGTH}


def cost_shape(config: dict[str, Any]) -> ModelShape:
    """The benchmark's shape: 8 of 256 routed experts plus one shared expert per token in mini."""
    c = LLaDA2Config.from_dict(config)
    moe = c.moe.num_experts > 0
    return ModelShape(
        d_model=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        mlp_hidden=c.moe.moe_intermediate_size if moe else c.intermediate_size,
        vocab_size=c.vocab_size,
        max_length=c.max_position_embeddings,
        attention_bias=c.use_qkv_bias,
        experts=c.moe.num_experts if moe else 1,
        active_experts=c.moe.num_experts_per_tok if moe else 1,
        shared_mlp_hidden=c.moe.moe_intermediate_size * c.moe.num_shared_experts if moe else 0,
    )


def tiny_config(shape: TinyShape) -> dict[str, Any]:
    """config.json of the bundled tiny-llada2: one dense layer, then MoE layers of 8 experts in 4
    groups of which 2 are kept, top-2, one shared expert (scripts/train_tiny.py)."""
    cfg = LLaDA2Config(
        hidden_size=shape.d_model,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.d_model // shape.heads,
        intermediate_size=shape.mlp,
        vocab_size=shape.vocab_size,
        moe=MoEConfig(
            hidden_size=shape.d_model,
            num_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            moe_intermediate_size=96,
            num_shared_experts=1,
        ),
        first_k_dense_replace=1,
        mask_token_id=shape.mask,
        eos_token_id=shape.eos,
        pad_token_id=shape.eos,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        partial_rotary_factor=0.5,
        max_position_embeddings=shape.max_length,
        use_qkv_bias=False,
        use_bias=False,
        use_qk_norm=True,
    )
    return llada2_config_dict(cfg)


SPECIAL_TOKENS = ("<|endoftext|>", "<role>", "<|role_end|>", "<|mask|>", "</role>")
# The role-tagged template of LLaDA2 / Ling-2.0 (docs/llada2.md): <role>HUMAN</role>text<|role_end|>
# per message, generation prompt <role>ASSISTANT</role>. Served checkpoints use their own template.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | map(attribute='text') | join('') %}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- set role = 'HUMAN' %}"
    "{%- else %}{%- set role = message['role'] | upper %}{%- endif %}"
    "{{- '<role>' + role + '</role>' + text + '<|role_end|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<role>ASSISTANT</role>' }}{%- endif %}"
)

SPEC = FamilySpec(
    name="llada2",
    title="LLaDA2.x",
    model_types=(MODEL_TYPE,),
    architectures=("llada2moe",),
    build=build,
    attention="block_aligned",
    default_preset="llada2",
    cost_shape=cost_shape,
    decode_defaults=decode_defaults,
    # A revision the native model refuses runs its own generate() with the llada2 presets' knobs
    # (block_length, steps, threshold, temperature, top_p; editing_threshold / max_post_steps).
    remote_code=True,
    tiny=TinyFormat(
        specials=SPECIAL_TOKENS,
        eos="<|endoftext|>",
        eot="<|role_end|>",
        mask="<|mask|>",
        tokenizer_config={
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "mask_token": "<|mask|>",
            "additional_special_tokens": ["<role>", "</role>", "<|role_end|>"],
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
        special_tokens_map={
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "mask_token": "<|mask|>",
        },
        config=tiny_config,
        objective="moe_aligned_block_diffusion",
        # Decoded block by block behind committed blocks: short canvases suffice, as for Nemotron.
        canvas_lengths=(32, 48, 32, 64),
        default_kv_heads=2,
        generation_eos_both=True,
    ),
)
