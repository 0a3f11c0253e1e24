"""The interface every native model implements, and the attention helpers they share.

A forward takes a batch of *query* tokens (a span of each row's canvas), their position ids, a
boolean attention mask over *keys*, an optional KV-cache view, and the query indices whose logits
the caller wants. Rows never need left padding: the engine right-pads spans and masks keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TokenRoles:
    """Special-token ids a sampler needs, read from the checkpoint (never hard-coded)."""

    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    eot_token_id: int | None = None

    @classmethod
    def from_ids(cls, mask: int, eos: int, pad: int, eot: int | None) -> TokenRoles:
        """Roles whose stop tokens are eos and, when the tokenizer has one, end-of-turn."""
        stops = tuple(dict.fromkeys(t for t in (eos, eot) if t is not None))
        return cls(
            mask_token_id=mask, eos_token_id=eos, pad_token_id=pad, stop_token_ids=stops, eot_token_id=eot
        )


class KVView(Protocol):
    """A per-forward view of a KV cache.

    ``update`` receives the fresh keys/values of the query tokens of one layer, shaped
    ``[batch, kv_heads, queries, head_dim]`` (keys after RoPE), stores what the cache keeps and
    returns the full keys/values the queries attend to, ``[batch, kv_heads, keys, head_dim]``,
    aligned with the attention mask's key axis.
    """

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


OfficialNames = str | tuple[str, ...]


@dataclass(frozen=True)
class WeightNames:
    """A family's table from internal parameter names to the published tensor names.

    ``top`` maps parameters of the model itself (``embed.weight``, ``norm``, ``head.weight``);
    ``layers`` maps parameters inside ``layers.{i}`` to official names containing ``{i}``. A tuple
    of official names is a fused parameter: the official tensors concatenated along dim 0, in that
    order (``qkv.weight`` from q, k, v; ``gate_up.weight`` from gate, up); exporting splits it again
    by the layer's ``splits`` (equal parts when it names none). Entries whose parameter the model
    does not have (an untied head, q/k norms, biases switched off) are skipped. ``optional`` names
    tensors a checkpoint may carry that the model does not use (a tied model's stored head).
    """

    top: Mapping[str, OfficialNames]
    layers: Mapping[str, OfficialNames]
    optional: tuple[str, ...] = ()


def llama_style_names(prefix: str, head: str) -> WeightNames:
    """The Llama/Qwen checkpoint layout under ``prefix`` (``embed_tokens``, ``layers.{i}.self_attn``
    q/k/v/o projections with optional q/k/v biases and q/k norms, the SwiGLU ``mlp``, the two layer
    norms, the final ``norm``) and the ``head`` tensor, which a tied checkpoint may still store.
    Entries a family's layers lack (biases, norms) are skipped, so one table serves Qwen2 and Qwen3."""
    layer = prefix + "layers.{i}."
    return WeightNames(
        top={
            "embed.weight": prefix + "embed_tokens.weight",
            "norm": prefix + "norm.weight",
            "head.weight": head,
        },
        layers={
            "attn_norm": layer + "input_layernorm.weight",
            "mlp_norm": layer + "post_attention_layernorm.weight",
            "qkv.weight": tuple(layer + f"self_attn.{x}_proj.weight" for x in "qkv"),
            "qkv.bias": tuple(layer + f"self_attn.{x}_proj.bias" for x in "qkv"),
            "o_proj.weight": layer + "self_attn.o_proj.weight",
            "gate_up.weight": (layer + "mlp.gate_proj.weight", layer + "mlp.up_proj.weight"),
            "down.weight": layer + "mlp.down_proj.weight",
            "q_norm": layer + "self_attn.q_norm.weight",
            "k_norm": layer + "self_attn.k_norm.weight",
        },
        optional=(head,),
    )


def _names(official: OfficialNames) -> tuple[str, ...]:
    return (official,) if isinstance(official, str) else tuple(official)


class StackConfig(Protocol):
    """The config fields ``DiffusionLM.build_stack`` reads (Llama/Qwen-style names; read-only, so
    frozen config dataclasses fit)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def intermediate_size(self) -> int: ...

    @property
    def num_hidden_layers(self) -> int: ...

    @property
    def num_attention_heads(self) -> int: ...

    @property
    def num_key_value_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @property
    def rms_norm_eps(self) -> float: ...

    @property
    def rope_theta(self) -> float: ...

    @property
    def max_position_embeddings(self) -> int: ...

    @property
    def tie_word_embeddings(self) -> bool: ...

    @property
    def mask_token_id(self) -> int: ...

    @property
    def eos_token_id(self) -> int: ...

    @property
    def pad_token_id(self) -> int: ...


class DiffusionLM(nn.Module):
    """Base class: a bidirectional (or block-causal) denoiser returning logits.

    The architectures differ inside their layers only, so the stack's forward lives here. A subclass
    builds ``embed`` (token embedding), ``layers`` (each called as ``layer(x, cos, sin, bias, kv, i)``),
    ``norm`` (final RMSNorm weight), ``head`` (output ``nn.Linear``, or None when tied to ``embed``)
    and ``rotary``, sets ``norm_eps``, and declares ``weight_names`` (its checkpoint's tensor names)
    and ``title`` (for messages); loading and exporting the official checkpoint are written here once.
    """

    weight_names: ClassVar[WeightNames]
    title: ClassVar[str] = "native"

    roles: TokenRoles
    vocab_size: int
    max_length: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    embed: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Parameter
    head: nn.Linear | None
    rotary: RotaryEmbedding

    def build_stack(
        self,
        cfg: StackConfig,
        eot_token_id: int | None,
        *,
        layer: type[DecoderLayer] | None = None,
        layer_at: Callable[[int], nn.Module] | None = None,
        rotary: RotaryEmbedding | None = None,
        **layer_options: Any,
    ) -> None:
        """The modules a Llama/Qwen-style family builds alike from its config: token roles and
        sizes, embedding, ``num_hidden_layers`` decoder layers (``layer``, default ``DecoderLayer``,
        with ``layer_options`` such as ``qk_norm`` or ``qkv_bias``; or ``layer_at(i)`` when layers
        differ by index, as dense and mixture-of-experts layers do), final norm, an untied head
        unless ``tie_word_embeddings``, and RoPE (``rotary``, default plain RoPE at ``rope_theta``)."""
        self.roles = TokenRoles.from_ids(cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, eot_token_id)
        self.vocab_size = cfg.vocab_size
        self.max_length = cfg.max_position_embeddings
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        make = layer or DecoderLayer
        self.layers = nn.ModuleList(
            layer_at(i)
            if layer_at is not None
            else make(
                cfg.hidden_size,
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim,
                cfg.intermediate_size,
                cfg.rms_norm_eps,
                **layer_options,
            )
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.rotary = rotary or RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.norm_eps = cfg.rms_norm_eps

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Logits at the requested positions; takes ``hidden_states``'s arguments."""
        return self.logits(self.hidden_states(*args, **kwargs))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv: KVView | None = None,
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last layer's output at the requested positions (before the final norm).

        Split from ``logits`` so a CUDA graph can hold the layers while its static output stays
        small; the vocabulary-wide logits are produced outside it.
        """
        x = self.embed(input_ids)
        cos, sin = self.rotary.cos_sin(position_ids)
        bias = attention_bias(attention_mask, input_ids.shape[1])
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, bias, kv, i)
        return gather_positions(x, logits_index)  # the LM head runs on the requested positions only

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head."""
        x = rms_norm(hidden, self.norm, self.norm_eps)
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(x, weight)[..., : self.vocab_size]  # LLaDA pads its embedding past the vocab

    # -- official checkpoint names ------------------------------------------------------------

    def weight_map(self) -> dict[str, tuple[str, ...]]:
        """Every parameter's official tensor name(s), from the family's ``weight_names`` table."""
        params = dict(self.named_parameters())
        table = self.weight_names
        out = {k: _names(v) for k, v in table.top.items() if k in params}
        for i in range(len(self.layers)):
            for internal, official in table.layers.items():
                name = f"layers.{i}.{internal}"
                if name in params:
                    out[name] = tuple(n.format(i=i) for n in _names(official))
        unmapped = sorted(set(params) - set(out))
        if unmapped:  # a module added without its row in the table: a bug, not a checkpoint problem
            raise TypeError(f"{type(self).__name__}.weight_names does not map {unmapped[:5]}")
        return out

    def load_official(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy tensors named as in the published checkpoint into the (fused) parameters.

        A missing tensor or one the model does not use is a ``KeyError`` naming it; a shape that
        differs is torch's ``RuntimeError``.
        """
        params = dict(self.named_parameters())
        used: set[str] = set()
        with torch.no_grad():
            for internal, names in self.weight_map().items():
                parts = []
                for name in names:
                    if name not in tensors:
                        raise KeyError(f"checkpoint is missing tensor {name!r}")
                    used.add(name)
                    parts.append(tensors[name])
                params[internal].copy_(parts[0] if len(parts) == 1 else torch.cat(parts))
        used.update(n for n in self.weight_names.optional if n in tensors)
        unexpected = sorted(set(tensors) - used)
        if unexpected:
            raise KeyError(f"checkpoint has tensors the {self.title} model does not use: {unexpected[:5]}")

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the official names (fused parameters split; contiguous copies).

        ``scripts/train_tiny.py`` saves its checkpoints with it, the DCP converter reads the names
        and shapes from it (on the meta device), and tests build random official checkpoints.
        """
        params = dict(self.named_parameters())
        out: dict[str, torch.Tensor] = {}
        for internal, names in self.weight_map().items():
            tensor = params[internal]
            pieces = [tensor] if len(names) == 1 else tensor.split(self._split_sizes(internal, len(names)))
            out.update(zip(names, pieces, strict=True))
        return {k: v.detach().contiguous().clone() for k, v in out.items()}

    def _split_sizes(self, internal: str, parts: int) -> list[int]:
        """Rows of each official tensor in a fused parameter: the layer's ``splits`` or equal parts."""
        path = internal.split(".")
        module = self.layers[int(path[1])] if path[0] == "layers" else self
        rows = self.get_parameter(internal).shape[0]
        sizes = getattr(module, "splits", {}).get(path[-2] if path[0] == "layers" else internal)
        return list(sizes) if sizes is not None else [rows // parts] * parts


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, cast back to the input dtype (as LLaDA and Qwen3 do)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight.float()).to(dtype)


class RotaryEmbedding(nn.Module):
    """NeoX rotate-half RoPE with angles computed in float32 from explicit position ids."""

    inv_freq: torch.Tensor  # a non-persistent buffer

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset()

    def reset(self) -> None:
        """(Re)compute the frequencies; needed after building on the meta device."""
        if self.inv_freq.is_meta:
            return
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=self.inv_freq.device)
        self.inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))

    def cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin shaped [batch, 1, seq, head_dim] in float32."""
        freqs = position_ids.float()[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [batch, heads, seq, head_dim] in float32 and cast back."""
    dtype = x.dtype
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos + rotated * sin).to(dtype)


def attention_bias(mask: torch.Tensor | None, queries: int) -> torch.Tensor | None:
    """Turn a key mask [B, K] or a query-key mask [B, Q, K] into SDPA's boolean [B, 1, Q, K].

    A query row with no visible key (a right-padding query) is allowed to see every key, so the
    softmax never produces NaN; its output is never used.
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask[:, None, :].expand(-1, queries, -1)
    empty = ~mask.any(dim=-1, keepdim=True)
    mask = mask | empty
    return mask[:, None]


def gather_positions(hidden: torch.Tensor, logits_index: torch.Tensor | None) -> torch.Tensor:
    """Select the query positions whose logits are wanted: the LM head never sees the rest."""
    if logits_index is None:
        return hidden
    idx = logits_index[..., None].expand(-1, -1, hidden.shape[-1])
    return torch.gather(hidden, 1, idx)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` dimensions of each head, the rest passed through
    (partial rotary); the whole head when the rotary width is the head's."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return torch.cat((apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)


class DecoderLayer(nn.Module):
    """Pre-RMSNorm attention and SwiGLU MLP with fused QKV and gate/up projections, grouped-query
    attention, RoPE on q and k, and (Qwen3 / Nemotron) optional per-head RMSNorm of q and k before
    RoPE. A LLaDA block is this layer without the q/k norms; the models differ in tensor names only,
    which their ``weight_names`` table maps.

    Seams for the families that differ a little: ``qkv_bias`` / ``o_bias`` (Qwen2-style attention
    biases), partial rotary (the model builds its ``RotaryEmbedding`` with fewer dimensions than
    ``head_dim``; the rest of each head is not rotated), and ``mlp`` (override it, and the modules it
    uses, for a mixture-of-experts MLP). ``splits`` gives the rows of each official tensor fused
    into one parameter, for exporting.
    """

    def __init__(
        self,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        mlp: int,
        eps: float,
        qk_norm: bool,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
    ) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.eps = heads, kv_heads, head_dim, eps
        self.attn_norm = nn.Parameter(torch.ones(hidden))
        self.mlp_norm = nn.Parameter(torch.ones(hidden))
        self.q_norm = nn.Parameter(torch.ones(head_dim)) if qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(head_dim)) if qk_norm else None
        self.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=o_bias)
        self.gate_up = nn.Linear(hidden, 2 * mlp, bias=False)
        self.down = nn.Linear(mlp, hidden, bias=False)
        self.splits: dict[str, list[int]] = {
            "qkv": [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        }

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """SwiGLU over the fused gate/up projection."""
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

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
        if self.q_norm is not None and self.k_norm is not None:  # both or neither
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
