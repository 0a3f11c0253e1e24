"""Native SDAR mixture-of-experts (JetLM ``SDARMoeForCausalLM``: SDAR-30B-A3B-Chat / -Sci) in plain PyTorch.

SDAR-30B-A3B is Qwen3-30B-A3B trained the SDAR way: SDAR's attention stack (``models/sdar.py``:
the same config keys, tensor names, blocks of ``block_size`` at absolute positions, mask token)
with Qwen3-MoE's sparse MLP in the layers ``decoder_sparse_step`` and ``mlp_only_layers`` select
(layer i is sparse when ``num_experts > 0``, i is not in ``mlp_only_layers`` and
``(i + 1) % decoder_sparse_step == 0``; the others keep the dense SwiGLU of
``intermediate_size``). A sparse layer is ``models/moe.py``'s block with the softmax router:
``model.layers.{i}.mlp.gate.weight`` scores ``num_experts`` experts, the ``num_experts_per_tok``
most probable run (``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``, each a SwiGLU
of ``moe_intermediate_size``), weighted by their probabilities, renormalised when
``norm_topk_prob``. docs/sdar.md has where each fact comes from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dllm_serve.models.base import DiffusionLM
from dllm_serve.models.family import FamilySpec, ModelShape, TinyShape
from dllm_serve.models.moe import MoEBlock, MoEConfig, SparseLayer, expert_weight_map, moe_of
from dllm_serve.models.sdar import (
    MOE_MODEL_TYPE,
    PREFIX,
    WEIGHT_NAMES,
    SDARConfig,
    sdar_config_dict,
    stack_fields,
)
from dllm_serve.models.sdar import SPEC as SDAR_SPEC
from dllm_serve.models.tokenizer import ChatTokenizer

MODEL_TYPE = MOE_MODEL_TYPE
ARCHITECTURE = "SDARMoeForCausalLM"
MLP_PREFIX = PREFIX + "layers.{i}.mlp."
# Keys only the published training code reads (the load-balancing loss); the forward ignores them.
TRAINING_ONLY = ("output_router_logits", "router_aux_loss_coef")


@dataclass(frozen=True)
class SDARMoeConfig(SDARConfig):
    """SDARConfig plus SDARMoeConfig's expert keys, with the published class's defaults (those of
    Qwen3-MoE's config class: 128 experts, 8 per token, 768 wide, no renormalisation, every layer
    sparse)."""

    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    @property
    def moe(self) -> MoEConfig:
        return MoEConfig(
            hidden_size=self.hidden_size,
            num_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            moe_intermediate_size=self.moe_intermediate_size,
            score_function="softmax",
            norm_topk_prob=self.norm_topk_prob,
        )

    def is_moe(self, layer: int) -> bool:
        """Qwen3-MoE's rule for which layers are sparse."""
        return (
            self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SDARMoeConfig:
        """Parse config.json; options the native model does not implement are errors, not ignored."""
        problems = []
        if raw.get("shared_expert_intermediate_size"):
            problems.append(f"shared_expert_intermediate_size={raw['shared_expert_intermediate_size']}")
        for key in ("score_function", "scoring_func"):
            if raw.get(key, "softmax") != "softmax":
                problems.append(f"{key}={raw[key]!r}")
        if problems:
            raise ValueError(
                f"SDAR-MoE config options not supported by the native model (Qwen3-MoE routing: "
                f"softmax, no shared experts): {problems}; use --trust-remote-code to run the "
                "checkpoint's own code"
            )
        fields = stack_fields(raw, "SDAR-MoE")
        step = raw.get("decoder_sparse_step", 1)
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"config.json decoder_sparse_step must be a positive integer, got {step!r}")
        dense = raw.get("mlp_only_layers") or []
        layers = fields["num_hidden_layers"]
        if not isinstance(dense, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers for i in dense
        ):
            raise ValueError(
                f"config.json mlp_only_layers must list layer indices in [0, {layers}), got {dense!r}"
            )
        cfg = cls(
            **fields,
            num_experts=int(raw.get("num_experts", 128) or 0),
            num_experts_per_tok=int(raw.get("num_experts_per_tok", 8)),
            moe_intermediate_size=int(raw.get("moe_intermediate_size", 768) or 0),
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            decoder_sparse_step=step,
            mlp_only_layers=tuple(dense),
        )
        if cfg.num_experts:
            cfg.moe.validate()
        return cfg


class SDARMoeLayer(SparseLayer):
    """SDAR's Qwen3 layer (q/k norms, GQA, RoPE) whose MLP is a mixture of experts where
    ``SDARMoeConfig.is_moe`` says so, the dense SwiGLU elsewhere."""

    def __init__(self, cfg: SDARMoeConfig, index: int) -> None:
        super().__init__(
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            cfg.rms_norm_eps,
            cfg.moe if cfg.is_moe(index) else None,
            qk_norm=True,
        )


class SDARMoeModel(DiffusionLM):
    """``SDARMoeForCausalLM``: SDAR's embedding, layers (dense or sparse MLP), final norm, head."""

    weight_names = WEIGHT_NAMES  # SDAR's names; the experts' are added per sparse layer
    title = "SDAR-MoE"

    def __init__(self, cfg: SDARMoeConfig, eot_token_id: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.build_stack(cfg, eot_token_id, layer_at=lambda i: SDARMoeLayer(cfg, i))

    def moe_blocks(self) -> list[MoEBlock]:
        return [blk for blk in map(moe_of, self.layers) if blk is not None]

    def weight_map(self) -> dict[str, tuple[str, ...]]:
        """SDAR's names plus, per sparse layer, the router's and every expert's."""
        return expert_weight_map(self, self.weight_names, MLP_PREFIX)


def build(config: dict[str, Any], tokenizer: ChatTokenizer) -> DiffusionLM:
    """The loader's entry point: config.json as a dict and the checkpoint's tokenizer."""
    return SDARMoeModel(SDARMoeConfig.from_dict(config), eot_token_id=tokenizer.end_of_turn_id)


def sdar_moe_config_dict(cfg: SDARMoeConfig) -> dict[str, Any]:
    """config.json in the published format: SDAR's keys plus SDARMoeConfig's expert keys."""
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SDARConfig)}
    out = sdar_config_dict(SDARConfig(**base))
    out.update(
        architectures=[ARCHITECTURE],
        model_type=MODEL_TYPE,
        decoder_sparse_step=cfg.decoder_sparse_step,
        mlp_only_layers=list(cfg.mlp_only_layers),
        moe_intermediate_size=cfg.moe_intermediate_size,
        norm_topk_prob=cfg.norm_topk_prob,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        output_router_logits=False,
        router_aux_loss_coef=0.001,
    )
    return out


def decode_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's block size as the requests' default ``block_length``."""
    return {"block_length": SDARMoeConfig.from_dict(config).block_size}


def cost_shape(config: dict[str, Any]) -> ModelShape:
    """The benchmark's shape: ``num_experts_per_tok`` of ``num_experts`` experts per token and
    layer, no shared expert. Every layer is costed as sparse (SDAR-30B-A3B has no dense layer)."""
    c = SDARMoeConfig.from_dict(config)
    moe = c.num_experts > 0
    return ModelShape(
        d_model=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        mlp_hidden=c.moe_intermediate_size if moe else c.intermediate_size,
        vocab_size=c.vocab_size,
        max_length=c.max_position_embeddings,
        experts=c.num_experts if moe else 1,
        active_experts=c.num_experts_per_tok if moe else 1,
    )


# The bundled tiny-sdar-moe: tiny-sdar's stack with layer 0 dense and 4 experts of half the dense
# width in the others, 2 per token, renormalised (scripts/tiny_sdar_moe.py upcycles tiny-sdar).
TINY_EXPERTS = 4
TINY_EXPERTS_PER_TOK = 2
TINY_DENSE_LAYERS = (0,)


def tiny_config(shape: TinyShape) -> dict[str, Any]:
    """config.json of the bundled tiny-sdar-moe (scripts/train_tiny.py --family sdar-moe)."""
    cfg = SDARMoeConfig(
        **shape.qwen_fields(),
        head_dim=shape.d_model // shape.heads,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        block_size=shape.block_size,
        num_experts=TINY_EXPERTS,
        num_experts_per_tok=TINY_EXPERTS_PER_TOK,
        moe_intermediate_size=shape.mlp // 2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=TINY_DENSE_LAYERS,
    )
    return sdar_moe_config_dict(cfg)


if SDAR_SPEC.tiny is None:  # pragma: no cover - SDAR ships a tiny format
    raise RuntimeError("SDAR's TinyFormat is missing")
SPEC = FamilySpec(
    name="sdar-moe",
    title="SDAR-MoE",
    model_types=(MODEL_TYPE,),
    architectures=("sdarmoe",),  # more specific than SDAR's "sdar", so SDARMoeForCausalLM lands here
    build=build,
    # SDAR's attention kind: the sdar / sdar_static presets and the aligned cache run it unchanged.
    attention=SDAR_SPEC.attention,
    default_preset=SDAR_SPEC.default_preset,
    cost_shape=cost_shape,
    decode_defaults=decode_defaults,
    # SDAR's tokenizer, chat template and objective; only config.json differs.
    tiny=dataclasses.replace(SDAR_SPEC.tiny, config=tiny_config),
)
