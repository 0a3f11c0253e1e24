"""SDAR-MoE's part of scripts/train_tiny.py: upcycling tiny-sdar's trained weights, routing-load log.

Upcycling (``--family sdar-moe --init models/tiny-sdar``): everything SDAR-MoE shares with SDAR
(embedding, head, norms, attention, the dense layers' MLPs) is copied. Each sparse layer's dense
SwiGLU of width I is split into ``k`` = ``num_experts_per_tok`` slices of I / k hidden units (the
experts' width); expert e holds slice ``e % k`` with its down projection multiplied by k. The
router gives each run of k consecutive experts (one of every slice) one shared random direction,
so the top-k always picks a whole run with equal weights 1 / k (renormalised), and the layer's
output is the dense MLP's (sum over slices of k * slice / k). Small noise on the experts and the
router then breaks the ties, so that training lets the experts diverge and the router learn.
Training continues with SDAR's objective (``aligned_block_diffusion``); the router is trained
by the loss alone (no balancing term) and the trainer logs each sparse layer's load.
"""

from __future__ import annotations

from typing import Any

import torch

from dllm_serve.models.moe import moe_of

EXPERT_NOISE = 0.01  # relative to each expert tensor's standard deviation
ROUTER_STD = 0.02
ROUTER_NOISE = 0.0002


@torch.no_grad()
def upcycle(model: Any, dense: Any, gen: torch.Generator) -> dict[str, Any]:
    """Initialise SDAR-MoE ``model`` from the dense SDAR ``dense`` (see the module docstring);
    returns the init record for TRAINING.json."""
    source = dense.state_dict()
    copied = []
    for name, param in model.named_parameters():
        if name in source and source[name].shape == param.shape:
            param.copy_(source[name])
            copied.append(name)
    sparse = []
    for i, layer in enumerate(model.layers):
        blk = moe_of(layer)
        if blk is None:
            continue
        cfg = blk.cfg
        e, k, width, hidden = (
            cfg.num_experts,
            cfg.num_experts_per_tok,
            cfg.moe_intermediate_size,
            cfg.hidden_size,
        )
        gate, up = dense.layers[i].gate_up.weight.chunk(2)
        down = dense.layers[i].down.weight
        if gate.shape[0] != k * width or e % k:
            raise ValueError(f"cannot split a dense MLP of {gate.shape[0]} into {k} experts of {width}")
        gate_up = blk.gate_up.view(e, 2 * width, hidden)
        down_e = blk.down.view(e, hidden, width)
        for x in range(e):
            part = slice((x % k) * width, (x % k + 1) * width)
            gate_up[x, :width] = gate[part]
            gate_up[x, width:] = up[part]
            down_e[x] = k * down[:, part]
        for t in (gate_up, down_e):
            t += EXPERT_NOISE * t.std() * torch.randn(t.shape, generator=gen)
        runs = ROUTER_STD * torch.randn(e // k, hidden, generator=gen)
        blk.gate.copy_(runs.repeat_interleave(k, 0) + ROUTER_NOISE * torch.randn(e, hidden, generator=gen))
        sparse.append(i)
    return {
        "from": "models/tiny-sdar",
        "copied": copied,
        "sparse_layers": sparse,
        "experts": (
            f"dense MLP split into num_experts_per_tok slices; expert e = slice e % k, down x k; "
            f"noise {EXPERT_NOISE} x std"
        ),
        "router": (
            f"one N(0, {ROUTER_STD}) direction per run of k experts (one of each slice) "
            f"+ N(0, {ROUTER_NOISE})"
        ),
    }


class RoutingLoad:
    """Each sparse layer's load since the last report: busiest expert's tokens / mean (1.00 = even)."""

    def __init__(self, model: Any) -> None:
        self.blocks = model.moe_blocks()
        self.totals = [torch.zeros(blk.cfg.num_experts) for blk in self.blocks]
        self.history: dict[int, list[float]] = {}
        self.step = 0

    def update(self) -> None:
        self.step += 1
        for blk, total in zip(self.blocks, self.totals, strict=True):
            total += blk.last_counts.float()

    def report(self) -> str:
        loads = [round(float(t.max() / t.mean()), 2) for t in self.totals]
        self.history[self.step] = loads
        self.totals = [torch.zeros_like(t) for t in self.totals]
        return "load max/mean " + " ".join(f"{x:.2f}" for x in loads)
