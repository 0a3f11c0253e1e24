"""The remote-code path calls a checkpoint's diffusion sampler, not transformers' generate().

Dream's published modeling code keeps transformers' autoregressive ``generate`` and adds its own
``diffusion_generate`` (returning a ModelOutput with ``sequences`` when asked); serving such a
checkpoint with --trust-remote-code must run the latter.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from dllm_serve.engine.algorithms import resolve_params
from dllm_serve.engine.remote import generate_remote
from dllm_serve.models.loader import RemoteModel


class _DreamLikeCode(nn.Module):
    """Stands in for a checkpoint's own modeling file (the code under test only calls into it)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 4)
        self.seen: dict[str, object] = {}

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def generate(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("the autoregressive generate() must not be called")

    def diffusion_generate(self, inputs: torch.Tensor, max_new_tokens: int, steps: int, temperature: float):
        self.seen = {"max_new_tokens": max_new_tokens, "steps": steps, "temperature": temperature}
        self.embed(inputs)  # one forward, counted by the embedding hook
        new = torch.tensor([[7, 8, 2, 9]])
        return SimpleNamespace(sequences=torch.cat([inputs, new], dim=1))


def test_diffusion_generate_is_preferred_and_its_model_output_read():
    code = _DreamLikeCode()
    model = RemoteModel(module=code, max_length=64, eos_token_id=2, stop_ids=(2,))
    params = resolve_params("llada", "llada", 4, {"steps": 4})
    ids, forwards = generate_remote(model, [1, 3, 5], params, 4)
    assert ids == [7, 8, 2]  # cut after the stop token, which is kept
    assert forwards == 1
    assert code.seen == {"max_new_tokens": 4, "steps": 4, "temperature": 0.0}
