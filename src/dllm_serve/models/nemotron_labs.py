"""Native Nemotron-Labs-Diffusion (``NemotronLabsDiffusionModel``, 3B / 8B / 14B) in plain PyTorch.

The published checkpoint is a Ministral-3 decoder stack, ``encoder.*``, plus a linear
``diffusion_head``: the tensor names of the older ``DiffEncoderModel`` (models/nemotron.py) without
the q/k norms. What differs is inside attention: RoPE is YaRN-scaled from ``rope_parameters`` and
each query is multiplied by Llama-4's position-dependent factor
``1 + beta * log(1 + floor(position / original_max_position_embeddings))`` (exactly 1 below that
length). One set of weights serves three decoding modes that differ only in the attention mask the
caller passes (causal for the autoregressive mode, the committed context and the verifier;
bidirectional inside the active block for diffusion and drafting), so the model is a forward and a
name map like the others; ``SPEC`` registers the family (models/registry.py). See
docs/nemotron-labs.md for where each fact comes from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dllm_serve.models.base import (
    DecoderLayer,
    DiffusionLM,
    KVView,
    RotaryEmbedding,
    apply_rope,
    attention_bias,
    gather_positions,
    rms_norm,
)
from dllm_serve.models.config_checks import llama_style_problems, refuse, required_eos, required_mask
from dllm_serve.models.family import FamilySpec, ModelShape, TinyFormat, TinyShape
from dllm_serve.models.nemotron import SPEC as NEMOTRON_SPEC
from dllm_serve.models.nemotron import NemotronModel
from dllm_serve.models.tokenizer import ChatTokenizer

MODEL_TYPE = "nemotron_labs_diffusion"
ARCHITECTURE = "NemotronLabsDiffusionModel"
# dlm_paradigm values of the published configuration class; they only change the training mask.
PARADIGMS = ("bidirectional", "block_diff", "autoregressive")


@dataclass(frozen=True)
class RopeParameters:
    """``rope_parameters`` of config.json: default or YaRN RoPE, plus Llama-4 query scaling."""

    rope_theta: float = 1_000_000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    llama_4_scaling_beta: float | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, rope_theta: float | None) -> RopeParameters:
        raw = dict(raw or {})
        rope_type = raw.get("rope_type") or raw.get("type") or "default"
        if rope_type not in ("default", "yarn"):
            raise ValueError(f"rope_parameters rope_type {rope_type!r} is not implemented (default, yarn)")
        theta = raw.get("rope_theta", rope_theta if rope_theta is not None else 1_000_000.0)
        orig = raw.get("original_max_position_embeddings")
        if rope_type == "yarn" and (raw.get("factor") is None or orig is None):
            raise ValueError("YaRN rope_parameters need factor and original_max_position_embeddings")

        def opt(key: str) -> float | None:
            return None if raw.get(key) is None else float(raw[key])

        return cls(
            rope_theta=float(theta),
            rope_type=rope_type,
            factor=float(raw.get("factor") or 1.0),
            original_max_position_embeddings=None if orig is None else int(orig),
            beta_fast=float(raw.get("beta_fast") or 32.0),
            beta_slow=float(raw.get("beta_slow") or 1.0),
            mscale=opt("mscale"),
            mscale_all_dim=opt("mscale_all_dim"),
            attention_factor=opt("attention_factor"),
            llama_4_scaling_beta=opt("llama_4_scaling_beta"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "yarn":
            out.update(
                factor=self.factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
                beta_fast=self.beta_fast,
                beta_slow=self.beta_slow,
            )
            for key in ("mscale", "mscale_all_dim", "attention_factor"):
                if getattr(self, key) is not None:
                    out[key] = getattr(self, key)
        if self.llama_4_scaling_beta is not None:
            out["llama_4_scaling_beta"] = self.llama_4_scaling_beta
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
        return out


@dataclass(frozen=True)
class NemotronLabsConfig:
    """The subset of NemotronLabsDiffusionConfig (config.json) that defines the network and tokens."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    bos_token_id: int | None = None
    tie_word_embeddings: bool = False
    rope: RopeParameters = field(default_factory=RopeParameters)
    dlm_paradigm: str = "bidirectional"
    block_size: int = 32
    ar_loss_weight: float = 1.0

    @property
    def rope_theta(self) -> float:
        """RoPE's base (the YaRN parameters carry it)."""
        return self.rope.rope_theta

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NemotronLabsConfig:
        """Parse config.json; options the native model does not implement are errors, not ignored."""
        problems = llama_style_problems(raw)
        if raw.get("mlp_bias"):
            problems.append("mlp_bias=true")
        if raw.get("sliding_window"):
            problems.append(f"sliding_window={raw.get('sliding_window')!r}")
        paradigm = raw.get("dlm_paradigm", "bidirectional")
        if paradigm not in PARADIGMS:
            problems.append(f"dlm_paradigm={paradigm!r}")
        refuse("Nemotron-Labs", problems)
        mask = required_mask(raw)
        eos = required_eos(raw)
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
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 262144)),
            mask_token_id=mask,
            eos_token_id=eos,
            pad_token_id=int(pad) if pad is not None else eos,
            bos_token_id=raw.get("bos_token_id"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope=RopeParameters.from_dict(raw.get("rope_parameters"), raw.get("rope_theta")),
            dlm_paradigm=paradigm,
            block_size=int(raw.get("block_size") or 32),
            ar_loss_weight=float(raw.get("ar_loss_weight", 1.0)),
        )


class YarnRotaryEmbedding(RotaryEmbedding):
    """RoPE with the inverse frequencies and cos/sin factor of ``rope_parameters`` (default or YaRN)."""

    def __init__(self, head_dim: int, rope: RopeParameters) -> None:
        self.rope = rope
        self.attention_factor = 1.0
        super().__init__(head_dim, rope.rope_theta)

    def reset(self) -> None:
        super().reset()
        r = self.rope
        if self.inv_freq.is_meta or r.rope_type != "yarn":
            return
        dim, base = self.head_dim, r.rope_theta
        orig = float(r.original_max_position_embeddings or 1)

        def correction_dim(rotations: float) -> float:
            return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = float(max(math.floor(correction_dim(r.beta_fast)), 0))
        high = float(min(math.ceil(correction_dim(r.beta_slow)), dim - 1))
        if low == high:
            high += 0.001
        device = self.inv_freq.device
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp  # share of the original frequency per dimension
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
        self.inv_freq = (1.0 / (r.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if r.attention_factor is not None:
            self.attention_factor = r.attention_factor
        elif r.mscale and r.mscale_all_dim:
            self.attention_factor = mscale(r.factor, r.mscale) / mscale(r.factor, r.mscale_all_dim)
        else:
            self.attention_factor = mscale(r.factor)

    def cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = super().cos_sin(position_ids)
        if self.attention_factor != 1.0:
            return cos * self.attention_factor, sin * self.attention_factor
        return cos, sin


class LabsDecoderLayer(DecoderLayer):
    """Ministral-3 layer: ``DecoderLayer`` without q/k norm, queries scaled per position after RoPE."""

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: torch.Tensor | None,
        kv: KVView | None,
        layer: int,
        q_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, q_len, _ = x.shape
        hd, nh, nkv = self.head_dim, self.heads, self.kv_heads
        h = rms_norm(x, self.attn_norm, self.eps)
        q, k, v = self.qkv(h).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = apply_rope(q.view(b, q_len, nh, hd).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(b, q_len, nkv, hd).transpose(1, 2), cos, sin)
        if q_scale is not None:
            q = q * q_scale.to(q.dtype)
        v = v.view(b, q_len, nkv, hd).transpose(1, 2)
        if kv is not None:
            k, v = kv.update(layer, k, v)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=nkv != nh)
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, q_len, nh * hd))
        return x + self.mlp(rms_norm(x, self.mlp_norm, self.eps))


class NemotronLabsModel(NemotronModel):
    """Ministral-3 stack with ``diffusion_head``; the published names are NemotronModel's (no q/k norm),
    so loading and export are inherited."""

    title = "Nemotron-Labs"

    def __init__(self, cfg: NemotronLabsConfig, eot_token_id: int | None = None) -> None:
        DiffusionLM.__init__(self)
        self.cfg = cfg  # type: ignore[assignment]
        self.build_stack(
            cfg,
            eot_token_id,
            layer=LabsDecoderLayer,
            rotary=YarnRotaryEmbedding(cfg.head_dim, cfg.rope),
            qk_norm=False,
        )

    def query_scale(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        """Llama-4 query scaling [batch, 1, seq, 1], or None when the config has none."""
        r = self.cfg.rope  # type: ignore[attr-defined]
        if r.llama_4_scaling_beta is None:
            return None
        orig = float(r.original_max_position_embeddings or self.max_length)
        scale = 1 + r.llama_4_scaling_beta * torch.log1p(torch.floor(position_ids.float() / orig))
        return scale[:, None, :, None]

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv: KVView | None = None,
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As ``DiffusionLM.hidden_states``, with the per-position query scale passed to each layer."""
        x = self.embed(input_ids)
        cos, sin = self.rotary.cos_sin(position_ids)
        q_scale = self.query_scale(position_ids)
        bias = attention_bias(attention_mask, input_ids.shape[1])
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, bias, kv, i, q_scale)
        return gather_positions(x, logits_index)


def build(config: dict[str, Any], tokenizer: ChatTokenizer) -> DiffusionLM:
    """The loader's entry point: config.json as a dict and the checkpoint's tokenizer."""
    return NemotronLabsModel(NemotronLabsConfig.from_dict(config), eot_token_id=tokenizer.end_of_turn_id)


def labs_config_dict(cfg: NemotronLabsConfig) -> dict[str, Any]:
    """config.json content in the published format (NemotronLabsDiffusionConfig keys)."""
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_implementation": "sdpa",
        "block_size": cfg.block_size,
        "dlm_loss_weight": None,
        "ar_loss_weight": cfg.ar_loss_weight,
        "dlm_paradigm": cfg.dlm_paradigm,
        "dp_varying_mask_ratio": False,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "mask_token_id": cfg.mask_token_id,
        "max_position_embeddings": cfg.max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": cfg.rope.to_dict(),
        "sliding_window": None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "vocab_size": cfg.vocab_size,
        "torch_dtype": "float32",
    }
    if cfg.bos_token_id is not None:
        out["bos_token_id"] = cfg.bos_token_id
    return out


def decode_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's block size as the presets' ``block_length``."""
    return {"block_length": NemotronLabsConfig.from_dict(config).block_size}


def cost_shape(config: dict[str, Any]) -> ModelShape:
    """The benchmark's shape, parsed by NemotronLabsConfig so defaults (KV heads, head_dim) match."""
    return ModelShape.of_dense_stack(NemotronLabsConfig.from_dict(config))


def tiny_config(shape: TinyShape) -> dict[str, Any]:
    """config.json of the bundled tiny-nemotron-labs (scripts/train_tiny.py): the published keys, and
    YaRN with Llama-4 query scaling active inside its 1024-token context (half of it is the
    "original" length), so the tiny model exercises the same RoPE path as the real ones."""
    rope = RopeParameters(
        rope_theta=10000.0,
        rope_type="yarn",
        factor=2.0,
        original_max_position_embeddings=shape.max_length // 2,
        mscale=1.0,
        mscale_all_dim=1.0,
        llama_4_scaling_beta=0.1,
    )
    cfg = NemotronLabsConfig(
        **shape.qwen_fields(),
        head_dim=shape.d_model // shape.heads,
        rms_norm_eps=1e-5,
        rope=rope,
        dlm_paradigm="block_diff",
        block_size=shape.block_size,
    )
    return labs_config_dict(cfg)


# The published tokenizer (Mistral's, 131072 ids; mask 100) is read from the checkpoint like any
# other; the tiny keeps tiny-nemotron's tokenizer and chat template (docs/nemotron-labs.md says why).
_NEMOTRON_TINY = NEMOTRON_SPEC.tiny
assert _NEMOTRON_TINY is not None

SPEC = FamilySpec(
    name="nemotron-labs",
    title="Nemotron-Labs-Diffusion",
    model_types=(MODEL_TYPE,),
    architectures=("nemotronlabsdiffusion",),
    build=build,
    attention="causal",
    default_preset="nemotron_labs",
    cost_shape=cost_shape,
    decode_defaults=decode_defaults,
    tiny=TinyFormat(
        specials=_NEMOTRON_TINY.specials,
        eos=_NEMOTRON_TINY.eos,
        eot=_NEMOTRON_TINY.eot,
        mask=_NEMOTRON_TINY.mask,
        tokenizer_config=_NEMOTRON_TINY.tokenizer_config,
        special_tokens_map=_NEMOTRON_TINY.special_tokens_map,
        config=tiny_config,
        objective="joint_ar_block_diffusion",
        # Like Nemotron: decoding never reaches past the active block, so short canvases suffice.
        canvas_lengths=(32, 48, 32, 64),
        default_kv_heads=2,
        generation_eos_both=True,
    ),
)
