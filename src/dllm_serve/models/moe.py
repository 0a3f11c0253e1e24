"""A sparse mixture-of-experts MLP: two published routers and one token-grouped expert execution.

Router logits are computed in float32 for both routers (``score_function``):

- ``"sigmoid"`` (LLaDA2, as published in ``modeling_llada2_moe.py``'s gate): sigmoid scores; the
  *choice* uses scores plus the per-expert ``expert_bias`` (the auxiliary-loss-free balancing
  correction), group-limited: the experts form ``n_group`` groups, each group is scored by the sum
  of its two best biased scores, the ``topk_group`` best groups stay, and the
  ``num_experts_per_tok`` best experts among them are chosen. The *weights* are the chosen experts'
  unbiased scores, normalised to sum to one (when more than one is chosen) and multiplied by
  ``routed_scaling_factor``. Shared experts (one SwiGLU of ``moe_intermediate_size *
  num_shared_experts``) see every token.
- ``"softmax"`` (Qwen3-MoE, so SDAR-30B-A3B): softmax over all experts' logits, the
  ``num_experts_per_tok`` most probable chosen, their probabilities the weights, renormalised to
  sum to one when ``norm_topk_prob``; no bias, no groups, no shared experts.

Execution: the (token, slot) pairs are sorted by expert so each expert's tokens are contiguous,
and every expert runs one matmul over all of its tokens of the whole batch (``torch._grouped_mm``,
one call for all experts, where the shapes allow it; a loop over the experts hit otherwise). No
Python runs per token. Each token's route is computed from its own hidden state alone, bit for
bit (see ``route``), so a request's routing does not depend on what it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dllm_serve.models.base import DecoderLayer, DiffusionLM, WeightNames


@dataclass(frozen=True)
class MoEConfig:
    hidden_size: int
    num_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    moe_intermediate_size: int
    num_shared_experts: int = 0
    score_function: Literal["sigmoid", "softmax"] = "sigmoid"
    norm_topk_prob: bool = True  # the softmax router's renormalisation (the sigmoid one always does)

    def validate(self) -> None:
        """ValueError for a routing the published gate could not run either."""
        e, g = self.num_experts, self.n_group
        if self.score_function == "softmax":
            if not 1 <= self.num_experts_per_tok <= e:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts={e}]"
                )
            if self.moe_intermediate_size < 1:
                raise ValueError("moe_intermediate_size must be set for a mixture-of-experts config")
            return
        if g < 1 or e % g or e // g < 2:
            raise ValueError(f"num_experts ({e}) must split into n_group ({g}) groups of at least 2 experts")
        if not 1 <= self.topk_group <= g:
            raise ValueError(f"topk_group ({self.topk_group}) must be in [1, n_group={g}]")
        if not 1 <= self.num_experts_per_tok <= self.topk_group * (e // g):
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts of "
                f"topk_group ({self.topk_group}) groups"
            )
        if self.moe_intermediate_size < 1:
            raise ValueError("moe_intermediate_size must be set for a mixture-of-experts config")


def route(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    expert_bias: torch.Tensor | None,
    cfg: MoEConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert indices [T, k] (best first) and their float32 weights [T, k] for tokens [T, H]."""
    t = hidden.shape[0]
    # One vector-matrix product per token (a batched GEMV), not one GEMM over the batch: a GEMM's
    # blocking depends on the number of rows, so a token's logits, and near a tie its experts, would
    # depend on what it is batched with. This way they are the same bits in any batch.
    w = gate_weight.float().t()
    logits = torch.bmm(hidden.float()[:, None, :], w.expand(t, -1, -1)).squeeze(1)
    if cfg.score_function == "softmax":
        probs, idx = torch.softmax(logits, dim=-1).topk(cfg.num_experts_per_tok, dim=-1)
        if cfg.norm_topk_prob:
            probs = probs / probs.sum(-1, keepdim=True)
        return idx, probs * cfg.routed_scaling_factor
    if expert_bias is None:
        raise ValueError("the sigmoid router needs its expert_bias")
    scores = torch.sigmoid(logits)
    biased = scores + expert_bias.float()
    grouped = biased.view(t, cfg.n_group, -1)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)
    groups = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
    keep = keep[:, :, None].expand_as(grouped).reshape(t, -1)
    idx = biased.masked_fill(~keep, float("-inf")).topk(cfg.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, idx)
    if cfg.num_experts_per_tok > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return idx, weights * cfg.routed_scaling_factor


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` sorted by expert times each expert's ``weight[e]`` (shaped [E, out, in]).

    ``counts[e]`` rows belong to expert e. One grouped GEMM where torch has it for these shapes
    (16-byte aligned rows; no autograd needed), else one matmul per expert that has rows.
    """
    if _grouped_ok(x, weight):
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    out = x.new_empty((x.shape[0], weight.shape[1]))
    start = 0
    for e, n in enumerate(counts.tolist()):  # one host read per call, then one matmul per active expert
        if n:
            out[start : start + n] = x[start : start + n] @ weight[e].T
            start += n
    return out


def _grouped_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or (torch.is_grad_enabled() and weight.requires_grad):
        return False
    if not GROUPED_GEMM:
        return False
    size = x.element_size()
    return x.shape[0] > 0 and (x.shape[1] * size) % 16 == 0 and (weight.shape[1] * size) % 16 == 0


# Module switch: tests compare the grouped GEMM with the per-expert loop.
GROUPED_GEMM = True


class MoEBlock(nn.Module):
    """Router, routed experts, optional shared experts.

    The experts' matrices are stored as the published per-expert tensors concatenated along dim 0
    (``gate_up``: expert 0's gate and up, expert 1's, ...; ``down``: each expert's down), which is
    how the family's weight map fuses them, and viewed as [E, 2I, H] / [E, H, I] to compute.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate = nn.Parameter(torch.empty(e, h))
        # A parameter (not a buffer) so dummy weights initialise it; training moves it by the
        # balancing rule, never by gradient (scripts/train_tiny.py sets requires_grad False).
        # The softmax router has none.
        self.expert_bias = nn.Parameter(torch.zeros(e)) if cfg.score_function == "sigmoid" else None
        self.gate_up = nn.Parameter(torch.empty(e * 2 * i, h))
        self.down = nn.Parameter(torch.empty(e * h, i))
        shared = cfg.num_shared_experts * i
        self.shared_gate_up = nn.Linear(h, 2 * shared, bias=False) if shared else None
        self.shared_down = nn.Linear(shared, h, bias=False) if shared else None
        self.last_counts: torch.Tensor | None = None  # tokens per expert of the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, weights = route(flat, self.gate, self.expert_bias, self.cfg)
        y = self.experts(flat, idx, weights)
        if self.shared_gate_up is not None and self.shared_down is not None:
            gate, up = self.shared_gate_up(flat).chunk(2, dim=-1)
            y = y + self.shared_down(F.silu(gate) * up)
        return y.view(shape)

    def experts(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum of each token's routed experts, the experts run on token groups."""
        t, k = idx.shape
        slots = idx.reshape(-1)
        order = torch.argsort(slots, stable=True)
        counts = torch.bincount(slots, minlength=self.cfg.num_experts)
        self.last_counts = counts
        e, hidden = self.cfg.num_experts, x.shape[-1]
        h = grouped_matmul(x[order // k], self.gate_up.view(e, -1, hidden), counts)
        gate, up = h.chunk(2, dim=-1)
        out_sorted = grouped_matmul(F.silu(gate) * up, self.down.view(e, hidden, -1), counts)
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted
        # Weighted in float32 and summed over the slots in routing order, as published.
        return (out.view(t, k, -1).float() * weights[..., None]).sum(1).to(x.dtype)

    def official_names(self, prefix: str) -> dict[str, tuple[str, ...]]:
        """Internal parameter -> published tensor name(s) under ``prefix`` (``model.layers.{i}.mlp.``)."""
        experts = range(self.cfg.num_experts)
        out = {
            "gate": (prefix + "gate.weight",),
            "gate_up": tuple(f"{prefix}experts.{e}.{m}_proj.weight" for e in experts for m in ("gate", "up")),
            "down": tuple(f"{prefix}experts.{e}.down_proj.weight" for e in experts),
        }
        if self.expert_bias is not None:
            out["expert_bias"] = (prefix + "gate.expert_bias",)
        if self.shared_gate_up is not None:
            out["shared_gate_up.weight"] = (
                prefix + "shared_experts.gate_proj.weight",
                prefix + "shared_experts.up_proj.weight",
            )
            out["shared_down.weight"] = (prefix + "shared_experts.down_proj.weight",)
        return out


class SparseLayer(DecoderLayer):
    """A decoder layer whose MLP is a mixture of experts when ``moe`` is given (the dense SwiGLU is
    then not built), the dense SwiGLU otherwise: the layers of LLaDA2 and SDAR-MoE."""

    def __init__(
        self,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        intermediate: int,
        eps: float,
        moe: MoEConfig | None,
        **options: bool,
    ) -> None:
        super().__init__(hidden, heads, kv_heads, head_dim, 1 if moe else intermediate, eps, **options)
        self.moe: MoEBlock | None = None
        if moe is not None:
            del self.gate_up, self.down  # the experts replace the dense MLP
            self.moe = MoEBlock(moe)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        return super().mlp(h) if self.moe is None else self.moe(h)


def moe_of(layer: nn.Module) -> MoEBlock | None:
    """A decoder layer's mixture of experts (its ``moe`` attribute), None for a dense layer."""
    moe = getattr(layer, "moe", None)
    return moe if isinstance(moe, MoEBlock) else None


def expert_weight_map(model: DiffusionLM, table: WeightNames, mlp_prefix: str) -> dict[str, tuple[str, ...]]:
    """Internal parameter -> published tensor name(s) for a stack whose layers may hold an ``moe``:
    the family's table plus, per MoE layer, the router's and every expert's names under
    ``mlp_prefix`` (containing ``{i}``, e.g. ``model.layers.{i}.mlp.``). The routed experts' names
    depend on the expert count, so the static table cannot list them."""
    params = dict(model.named_parameters())
    out = {k: _tuple(v) for k, v in table.top.items() if k in params}
    for i, layer in enumerate(model.layers):
        names = {k: _tuple(v) for k, v in table.layers.items()}
        moe = moe_of(layer)
        if moe is not None:
            names.update({f"moe.{k}": v for k, v in moe.official_names(mlp_prefix).items()})
        for internal, official in names.items():
            if f"layers.{i}.{internal}" in params:
                out[f"layers.{i}.{internal}"] = tuple(n.format(i=i) for n in official)
    unmapped = sorted(set(params) - set(out))
    if unmapped:
        raise TypeError(f"{type(model).__name__}.weight_map does not map {unmapped[:5]}")
    return out


def _tuple(names: str | tuple[str, ...]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)
