"""LLaDA2.1's token-to-token editing: which already-decoded positions of the active block change.

A position is edited when it held a token (not a mask) before this step, is not part of the
prompt, the model's chosen token there differs from the one it holds, and the chosen token's
confidence exceeds the row's editing threshold (strictly, as published). Rows without editing
pass a threshold above 1, which no probability exceeds. Pure and row-vectorised like the rules.
"""

from __future__ import annotations

import torch


def edit_mask(
    block: torch.Tensor,
    tokens: torch.Tensor,
    conf: torch.Tensor,
    editable: torch.Tensor,
    threshold: torch.Tensor,
) -> torch.Tensor:
    """[B, P] positions to overwrite with ``tokens``.

    ``block``: the tokens held before the step; ``editable``: positions that may be edited (decoded
    earlier, not prompt, inside the row's block); ``threshold``: [B] per row.
    """
    return editable & (tokens != block) & (conf > threshold[:, None])
