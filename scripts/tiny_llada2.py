"""LLaDA2's part of scripts/train_tiny.py: format, model shapes, objective, routing balance, init.

Objective: block diffusion with blocks counted from position 0 (the published LLaDA2 mask: the
prompt is block-causal too, and the block holding the prompt's tail is the first one decoded).
Each row is ``[prompt | clean response | noisy copy of the blocks from the first decoded one]``:
clean tokens attend block-causally, which gives exactly the K/V the engine caches for committed
blocks; a noisy block attends to the clean blocks before it and to itself. Inside each noisy block
the response tokens are masked with ratio p = (1 - eps) * t + eps, t ~ U(0, 1) per (row, block),
prompt tokens never; the loss is the mean cross-entropy on masked tokens.

Routing: the expert-bias is moved by the auxiliary-loss-free balancing rule (each step, every
expert's bias goes up by BIAS_RATE if it got fewer than the mean number of tokens, down if more),
never by gradient; the trainer prints each MoE layer's load (busiest expert's tokens / mean).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

BLOCK = 32
BIAS_RATE = 1e-3
# tiny-nemotron's special tokens take ids 0-3; an init from it renames them (same roles: text end,
# turn start, turn end, mask) and adds </role>.
FROM_NEMOTRON = {"<|endoftext|>": "<|endoftext|>", "<|im_start|>": "<role>", "<|im_end|>": "<|role_end|>"}


def tokenizer_json_from_nemotron(source: Path) -> dict[str, Any]:
    """tiny-nemotron's BPE with its special tokens renamed to LLaDA2's and ``</role>`` appended."""
    tok = json.loads((source / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    for added in tok["added_tokens"]:
        new = FROM_NEMOTRON.get(added["content"], added["content"])
        if added["content"] in vocab:
            vocab[new] = vocab.pop(added["content"])
        added["content"] = new
    next_id = max(max(vocab.values()), max(a["id"] for a in tok["added_tokens"])) + 1
    template = dict(tok["added_tokens"][0])
    tok["added_tokens"].append({**template, "id": next_id, "content": "</role>"})
    vocab["</role>"] = next_id
    return tok


def init_from_nemotron(model: Any, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Copy tiny-nemotron's embeddings, head, norms, attention and dense-layer MLP; returns what was
    copied. Rows past its vocabulary (the added ``</role>``) and the experts keep their init."""
    copied = []

    def put(target: torch.Tensor, name: str) -> None:
        source = tensors[name]
        if source.shape == target.shape:
            target.copy_(source)
        else:  # the embedding and head: one more row here
            target[: source.shape[0]].copy_(source)
        copied.append(name)

    with torch.no_grad():
        put(model.embed.weight, "encoder.embed_tokens.weight")
        put(model.norm, "encoder.norm.weight")
        put(model.head.weight, "diffusion_head.weight")
        for i, layer in enumerate(model.layers):
            p = f"encoder.layers.{i}."
            put(layer.attn_norm, p + "input_layernorm.weight")
            put(layer.mlp_norm, p + "post_attention_layernorm.weight")
            put(layer.q_norm, p + "self_attn.q_norm.weight")
            put(layer.k_norm, p + "self_attn.k_norm.weight")
            qkv = torch.cat([tensors[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
            layer.qkv.weight.copy_(qkv)
            put(layer.o_proj.weight, p + "self_attn.o_proj.weight")
            copied.append(p + "self_attn.{q,k,v}_proj.weight")
            if layer.moe is None:
                gate_up = torch.cat([tensors[p + "mlp.gate_proj.weight"], tensors[p + "mlp.up_proj.weight"]])
                layer.gate_up.weight.copy_(gate_up)
                put(layer.down.weight, p + "mlp.down_proj.weight")
    return copied


def aligned_batch(
    prompts: list[list[int]],
    responses: list[list[int]],
    mask_id: int,
    pad_id: int,
    gen: torch.Generator,
    block: int = BLOCK,
    eps: float = 1e-3,
) -> dict[str, torch.Tensor]:
    """Inputs, positions, [B, W, W] mask, noisy-copy indices/targets/masked flags (see module doc)."""
    b = len(prompts)
    rows = []
    for p, r in zip(prompts, responses, strict=True):
        seq = p + r
        start = (len(p) // block) * block  # first decoded block
        rows.append((seq, len(p), start))
    width = max(len(s) + len(s) - st for s, _, st in rows)
    noisy_len = max(len(s) - st for s, _, st in rows)
    n_blocks = -(-noisy_len // block) + 1
    t = (torch.arange(b)[:, None] + torch.rand(b, n_blocks, generator=gen)) / b
    t = torch.gather(t, 0, torch.rand(b, n_blocks, generator=gen).argsort(0))
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    positions = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, width, width), dtype=torch.bool)
    noisy_index = torch.zeros((b, noisy_len), dtype=torch.long)
    targets = torch.full((b, noisy_len), pad_id, dtype=torch.long)
    masked = torch.zeros((b, noisy_len), dtype=torch.bool)
    for i, (seq, plen, start) in enumerate(rows):
        n, m = len(seq), len(seq) - start
        pos = torch.arange(n)
        noisy_pos = torch.arange(start, n)
        blk_clean, blk_noisy = pos // block, noisy_pos // block
        ratio = (1 - eps) * t[i, blk_noisy - blk_noisy[0]] + eps
        hide = (torch.rand(m, generator=gen) < ratio) & (noisy_pos >= plen)
        clean = torch.tensor(seq)
        noisy = torch.where(hide, torch.full((m,), mask_id), clean[start:])
        ids[i, :n], ids[i, n : n + m] = clean, noisy
        positions[i, :n], positions[i, n : n + m] = pos, noisy_pos
        mask[i, :n, :n] = blk_clean[None, :] <= blk_clean[:, None]
        mask[i, n : n + m, :n] = blk_clean[None, :] < blk_noisy[:, None]
        mask[i, n : n + m, n : n + m] = blk_noisy[None, :] == blk_noisy[:, None]
        noisy_index[i, :m] = torch.arange(n, n + m)
        targets[i, :m] = clean[start:]
        masked[i, :m] = hide
    return {
        "ids": ids,
        "positions": positions,
        "mask": mask,
        "noisy_index": noisy_index,
        "targets": targets,
        "masked": masked,
    }


def loss(model: Any, prompts, responses, mask_id: int, pad_id: int, gen: torch.Generator) -> torch.Tensor:
    """Mean cross-entropy on the masked response tokens of the noisy copy."""
    batch = aligned_batch(prompts, responses, mask_id, pad_id, gen)
    logits = model(batch["ids"], batch["positions"], batch["mask"], None, batch["noisy_index"])
    m = batch["masked"]
    return F.cross_entropy(logits[m].float(), batch["targets"][m])


class RoutingBalance:
    """Moves each MoE layer's expert bias toward equal load and keeps load statistics for the log."""

    def __init__(self, model: Any) -> None:
        self.blocks = model.moe_blocks()
        for blk in self.blocks:
            blk.expert_bias.requires_grad_(False)
        self.totals = [torch.zeros(blk.cfg.num_experts) for blk in self.blocks]

    def update(self) -> None:
        with torch.no_grad():
            for blk, total in zip(self.blocks, self.totals, strict=True):
                counts = blk.last_counts.float()
                total += counts
                blk.expert_bias += BIAS_RATE * torch.sign(counts.mean() - counts)

    def report(self) -> str:
        """Per MoE layer: busiest expert's share over the mean since the last report (1.00 = even)."""
        parts = [f"{float(t.max() / t.mean()):.2f}" for t in self.totals]
        self.totals = [torch.zeros_like(t) for t in self.totals]
        return "load max/mean " + " ".join(parts)

    @staticmethod
    def record() -> dict[str, Any]:
        return {"expert_bias_rate": BIAS_RATE, "rule": "aux-loss-free sign update of gate.expert_bias"}
