"""The `llada` preset reproduces the published LLaDA sampler step for step.

The reference below is written from the published algorithm (full canvas each step, semi-
autoregressive blocks, linear schedule with the remainder first, float64 Gumbel-max from the
global generator, low_confidence or random remasking, CFG, the two EOS options). It runs one
prompt at a time; the engine runs all prompts in one batch with different lengths. Random
weights keep probabilities unsaturated, so confidence ties (where top-k order is arbitrary) do
not occur.
"""

from __future__ import annotations

import pytest
import torch

from dllm_serve.config import EngineConfig
from dllm_serve.engine.algorithms import resolve_params
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.loader import load_model
from tests.helpers import random_llada_config, random_official_weights, write_llada_checkpoint

MASK, EOS, EOT = 5, 1, 4


def reference_generate(
    model,
    prompt,
    *,
    steps,
    gen_length,
    block_length,
    temperature=0.0,
    cfg_scale=0.0,
    remasking="low_confidence",
    logits_eos_inf=False,
    confidence_eos_eot_inf=False,
    seed=0,
):
    torch.manual_seed(seed)
    n = len(prompt) + gen_length
    x = torch.full((1, n), MASK, dtype=torch.long)
    x[0, : len(prompt)] = torch.tensor(prompt)
    prompt_index = x != MASK
    positions = torch.arange(n)[None]
    blocks = gen_length // block_length
    per_block = steps // blocks
    for b in range(blocks):
        start = len(prompt) + b * block_length
        end = start + block_length
        masks = int((x[0, start:end] == MASK).sum())
        schedule = [masks // per_block + (1 if i < masks % per_block else 0) for i in range(per_block)]
        for i in range(per_block):
            mask_index = x == MASK
            if cfg_scale > 0:
                un = x.clone()
                un[prompt_index] = MASK
                cond, uncond = model(torch.cat([x, un]), positions.expand(2, -1)).chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model(x, positions)
            if logits_eos_inf:
                logits[:, :, EOS] = -torch.inf
            if temperature > 0:
                l64 = logits.double()
                noise = torch.rand_like(l64)
                x0 = (l64.exp() / (-torch.log(noise)) ** temperature).argmax(-1)
            else:
                x0 = logits.argmax(-1)
            if confidence_eos_eot_inf:
                logits[:, :, EOT] = -torch.inf
            if remasking == "low_confidence":
                x0_p = torch.softmax(logits.float(), -1).gather(-1, x0[..., None]).squeeze(-1)
            else:
                x0_p = torch.rand(x0.shape)
            x0_p[:, end:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-torch.inf))
            chosen = torch.topk(confidence[0], schedule[i]).indices
            x[0, chosen] = x0[0, chosen]
    return x[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    cfg = random_llada_config(n_layers=2, d_model=64, n_kv_heads=2)
    path = write_llada_checkpoint(
        tmp_path_factory.mktemp("ref") / "m", cfg, random_official_weights(cfg, scale=0.3)
    )
    return load_model(path)


PROMPTS = [[0, 17, 40, 99, 23], [0, 230, 11], [0, 7, 8, 9, 10, 11, 12, 13, 200]]
CASES = {
    "argmax-1-per-step": dict(steps=16, gen_length=16, block_length=8),
    "argmax-uneven-schedule": dict(steps=6, gen_length=16, block_length=8),
    "one-block": dict(steps=5, gen_length=12, block_length=12),
    "gumbel": dict(steps=16, gen_length=16, block_length=8, temperature=0.9),
    "random-remasking": dict(steps=8, gen_length=16, block_length=8, remasking="random", temperature=0.5),
    "cfg": dict(steps=8, gen_length=16, block_length=8, cfg_scale=0.7),
    "eos-options": dict(
        steps=16, gen_length=16, block_length=8, logits_eos_inf=True, confidence_eos_eot_inf=True
    ),
}


def _truncate_at_stop(tokens: list[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in (EOS, EOT):
            return tokens[:i]
    return tokens


@pytest.mark.parametrize("case", sorted(CASES))
def test_llada_preset_matches_reference(loaded, case):
    opts = dict(CASES[case])
    gen_length = opts.pop("gen_length")
    engine = Engine(loaded, EngineConfig(max_batch_size=8))
    requests, expected = [], []
    for i, prompt in enumerate(PROMPTS):
        seed = 100 + i
        params = resolve_params("llada", "llada", gen_length, {**opts, "seed": seed, "early_stop": False})
        requests.append(GenerationRequest(f"r{i}", prompt, params, gen_length))
        expected.append(reference_generate(loaded.model, prompt, gen_length=gen_length, seed=seed, **opts))
    results = engine.run_to_completion(requests)
    for i, want in enumerate(expected):
        got = results[f"r{i}"]
        assert got.token_ids == _truncate_at_stop(want), f"prompt {i}"
        assert got.forwards == opts["steps"] * (2 if opts.get("cfg_scale") else 1)
        assert got.finish_reason == ("stop" if len(_truncate_at_stop(want)) < gen_length else "length")
