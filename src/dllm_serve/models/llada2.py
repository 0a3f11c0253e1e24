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

import torch
import torch.nn.functional as F
from torch import nn

from dllm_serve.models.base import DiffusionLM, KVView, RotaryEmbedding, TokenRoles, rms_norm
from dllm_serve.models.moe import MoEBlock, MoEConfig
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
        problems = []
        if raw.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={raw.get('hidden_act')!r}")
        scaling = raw.get("rope_scaling")
        if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
            problems.append(f"rope_scaling={scaling!r}")
        if raw.get("score_function", "sigmoid") != "sigmoid":
            problems.append(f"score_function={raw.get('score_function')!r}")
        if raw.get("norm_head"):
            problems.append("norm_head=true")
        if raw.get("use_sliding_window"):
            problems.append("use_sliding_window=true")
        if problems:
            raise ValueError(
                f"LLaDA2 config options not supported by the native model: {problems}; "
                "use --trust-remote-code to run the checkpoint's own code"
            )
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
        eos_id = raw.get("eos_token_id", eos if eos is not None else GENERATE_EOS_ID)
        if isinstance(eos_id, list):
            eos_id = eos_id[0]
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


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first ``cos.shape[-1]`` channels of each head, in float32; the rest
    pass through unchanged."""
    dim = cos.shape[-1]
    dtype = x.dtype
    rot, rest = x[..., :dim].float(), x[..., dim:]
    half = dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat(((rot * cos + rotated * sin).to(dtype), rest), dim=-1)


class DenseMLP(nn.Module):
    """SwiGLU with the gate/up pair fused (``gate_proj``/``up_proj`` in the checkpoint)."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class LLaDA2Layer(nn.Module):
    """Pre-RMSNorm attention (partial RoPE, q/k norm, optional biases) then a dense or MoE MLP."""

    def __init__(self, cfg: LLaDA2Config, index: int) -> None:
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim, self.eps = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
            cfg.rms_norm_eps,
        )
        self.attn_norm = nn.Parameter(torch.ones(h))
        self.mlp_norm = nn.Parameter(torch.ones(h))
        self.q_norm = nn.Parameter(torch.ones(hd)) if cfg.use_qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(hd)) if cfg.use_qk_norm else None
        self.qkv = nn.Linear(h, (self.heads + 2 * self.kv_heads) * hd, bias=cfg.use_qkv_bias)
        self.o_proj = nn.Linear(self.heads * hd, h, bias=cfg.use_bias)
        self.mlp: nn.Module = MoEBlock(cfg.moe) if cfg.is_moe(index) else DenseMLP(h, cfg.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: torch.Tensor | None,
        kv: KVView | None,
        layer: int,
    ) -> torch.Tensor:
        b, q_len, _ = x.shape
        hd, nh, nkv = self.head_dim, self.heads, self.kv_heads
        h = rms_norm(x, self.attn_norm, self.eps)
        q, k, v = self.qkv(h).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(b, q_len, nh, hd)
        k = k.view(b, q_len, nkv, hd)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, self.eps)
            k = rms_norm(k, self.k_norm, self.eps)
        q = apply_partial_rope(q.transpose(1, 2), cos, sin)
        k = apply_partial_rope(k.transpose(1, 2), cos, sin)
        v = v.view(b, q_len, nkv, hd).transpose(1, 2)
        if kv is not None:
            k, v = kv.update(layer, k, v)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=nkv != nh)
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, q_len, nh * hd))
        return x + self.mlp(rms_norm(x, self.mlp_norm, self.eps))


class LLaDA2Model(DiffusionLM):
    """``LLaDA2MoeModelLM``: word embeddings, LLaDA2 layers, final norm, ``lm_head``."""

    def __init__(self, cfg: LLaDA2Config, eot_token_id: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.roles = TokenRoles.from_ids(cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, eot_token_id)
        self.vocab_size = cfg.vocab_size
        self.max_length = cfg.max_position_embeddings
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.decode_defaults: dict[str, Any] = {"block_length": BLOCK_LENGTH}
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LLaDA2Layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        # The published rotary embedding computes its frequencies over the rotated channels only.
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta)
        self.norm_eps = cfg.rms_norm_eps

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoEBlock)]

    # -- official checkpoint names ------------------------------------------------------------

    def _names(self) -> list[tuple[str, torch.Tensor]]:
        """(official name, local tensor or fused slice) for every checkpoint tensor."""
        cfg = self.cfg
        out: list[tuple[str, torch.Tensor]] = [
            (PREFIX + "word_embeddings.weight", self.embed.weight),
            (PREFIX + "norm.weight", self.norm),
        ]
        if self.head is not None:
            out.append((HEAD, self.head.weight))
        for i, layer in enumerate(self.layers):
            p = f"{PREFIX}layers.{i}."
            a = p + "attention."
            out += [
                (p + "input_layernorm.weight", layer.attn_norm),
                (p + "post_attention_layernorm.weight", layer.mlp_norm),
                (a + "query_key_value.weight", layer.qkv.weight),
                (a + "dense.weight", layer.o_proj.weight),
            ]
            if cfg.use_qkv_bias:
                out.append((a + "query_key_value.bias", layer.qkv.bias))
            if cfg.use_bias:
                out.append((a + "dense.bias", layer.o_proj.bias))
            if layer.q_norm is not None:
                out += [
                    (a + "query_layernorm.weight", layer.q_norm),
                    (a + "key_layernorm.weight", layer.k_norm),
                ]
            mlp = layer.mlp
            if isinstance(mlp, MoEBlock):
                out += mlp.official_names(p + "mlp.")
            else:
                gate, up = mlp.gate_up.weight.chunk(2)
                out += [
                    (p + "mlp.gate_proj.weight", gate),
                    (p + "mlp.up_proj.weight", up),
                    (p + "mlp.down_proj.weight", mlp.down.weight),
                ]
        return out

    def load_official(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors named as in the published checkpoint into the fused modules."""
        names = self._names()
        with torch.no_grad():
            for name, target in names:
                if name not in tensors:
                    raise KeyError(f"checkpoint is missing tensor {name!r}")
                source = tensors[name]
                if source.shape != target.shape:
                    raise ValueError(
                        f"tensor {name!r} has shape {tuple(source.shape)}, expected {tuple(target.shape)}"
                    )
                target.copy_(source)
        used = {name for name, _ in names}
        if self.head is None:
            used.add(HEAD)  # tied checkpoints may still store the (identical) head
        unexpected = sorted(set(tensors) - used)
        if unexpected:
            raise KeyError(f"checkpoint has tensors the LLaDA2 model does not use: {unexpected[:5]}")

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the published names (un-fused, contiguous copies)."""
        return {name: t.detach().contiguous().clone() for name, t in self._names()}


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
