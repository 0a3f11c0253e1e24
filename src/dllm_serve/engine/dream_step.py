"""One decoding step of Dream's own rules (``timestep``, ``origin``) for the rows that use them.

Each row is one request decoded as Dream's ``diffusion_generate`` decodes a batch of one: the
random draws come from the request's own generator in the published order and shapes (``origin``:
one uniform per masked position, then a categorical draw for each position that transfers;
the others: a categorical draw for every masked position, then, with ``alg_temp``, the committed
positions drawn over the whole canvas), so a seeded request gives the published tokens and its
tokens never depend on its batch. The masked positions of a row are known on the host (its
block), so only ``origin`` at temperature > 0 reads a device value back (which positions transfer).
"""

from __future__ import annotations

import torch

from dllm_serve.decoding import dream
from dllm_serve.engine.sequence import Sequence


def decide(
    seqs: list[Sequence], logits: torch.Tensor, blocks: torch.Tensor, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, commit mask and confidence [B, P] for rows decoded by Dream's rules.

    ``logits`` [B, P, V] are each row's active-block logits (already shifted); ``blocks`` [B, P]
    the rows' block tokens on the host.
    """
    params = [s.params for s in seqs]
    filtered = dream.filter_logits(
        logits, [p.temperature for p in params], [p.top_p for p in params], [p.top_k for p in params]
    )
    probs = filtered.softmax(-1)
    tokens = torch.full(blocks.shape, mask_id, dtype=torch.long, device=logits.device)
    commit = torch.zeros(blocks.shape, dtype=torch.bool, device=logits.device)
    conf = torch.zeros(blocks.shape, dtype=torch.float32, device=logits.device)
    for i, (seq, p) in enumerate(zip(seqs, params, strict=True)):
        masked = (blocks[i, : p.block_length] == mask_id).nonzero()[:, 0]
        if masked.numel() == 0:
            continue
        where = masked.to(logits.device)
        row = probs[i, where]
        step, steps = seq.step_in_block, p.steps_per_block
        if p.rule == "origin":
            chance = dream.origin_probability(step, steps, p.eps)
            draws = torch.rand(masked.shape[0], generator=seq.generator, device=logits.device)
            transfer = draws < chance
            picked = where[transfer]
            chosen = dream.choose(row[transfer], p.temperature, seq.generator)
            tokens[i, picked] = chosen
            commit[i, picked] = True
            conf[i, picked] = row[transfer].gather(-1, chosen[:, None])[:, 0]
            continue
        chosen = dream.choose(row, p.temperature, seq.generator)
        scores = dream.confidence(row, chosen, p.remasking)
        tokens[i, where] = chosen
        conf[i, where] = scores
        count = dream.transfer_count(masked.shape[0], step, steps, p.eps)
        if count == 0:
            continue
        # Dream ranks over the whole sequence (prompt and committed positions at -inf).
        full = torch.full((seq.length,), -torch.inf, dtype=scores.dtype, device=logits.device)
        full[seq.block_start + where] = scores
        picked = dream.sample_transfer(full, count, p.alg_temp, seq.generator) - seq.block_start
        commit[i, picked] = True
    return tokens, commit, conf
