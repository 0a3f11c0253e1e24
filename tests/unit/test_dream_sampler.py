"""The ``dream_*`` presets reproduce Dream's published ``diffusion_generate`` step for step.

``reference_generate`` below is a plain transcription, written for this test, of the published
``DreamGenerationMixin._sample`` for one prompt without padding (attention "full"): the canvas is
prompt + max_new_tokens masks; every step runs the whole canvas, shifts the logits right by one,
and either transfers each masked position with probability 1 - s/t (``origin``: ``torch.rand``,
then a draw for the transferred ones) or draws a token for every masked position and commits the
``int(masked * (1 - s/t))`` most confident (``torch.topk``, or ``torch.multinomial`` over
softmax(confidence / alg_temp)), all remaining at the last step. Its random numbers come from the
*global* generator after ``torch.manual_seed(seed)``, as in the published code; the engine draws
the same calls, in the same order and shapes, from the request's own generator seeded with the
same ``seed`` (CPU generators of one seed give the same stream), so the tokens must be equal. The
engine runs the prompts as one batch of different lengths; the reference runs each alone. Random
weights keep probabilities unsaturated, so no two positions tie in confidence (where the
published ``torch.topk`` order is unspecified; the engine takes the leftmost).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributions as dists
import torch.nn.functional as F

from dllm_serve.config import EngineConfig
from dllm_serve.decoding import dream
from dllm_serve.engine.algorithms import ParamError, resolve_params
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.loader import load_model
from tests.dream_helpers import random_dream_config, random_dream_weights, special_ids, write_dream_checkpoint

IDS = special_ids()
MASK, EOS, EOT = IDS["<|mask|>"], IDS["<|endoftext|>"], IDS["<|im_end|>"]


def published_filters(logits, temperature, top_p, top_k):
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = 0
        mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_indices, remove)
        logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
    if top_k is not None:
        k = min(top_k, logits.size(-1))
        logits = logits.masked_fill(
            logits < torch.topk(logits, k)[0][..., -1, None], torch.finfo(logits.dtype).min
        )
    return logits


def published_sample_tokens(logits, temperature, top_p, top_k, margin=False, entropy=False):
    probs = torch.softmax(published_filters(logits, temperature, top_p, top_k), dim=-1)
    if temperature > 0:
        x0 = dists.Categorical(probs=probs).sample()
        confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin:
        top = torch.sort(probs, dim=-1, descending=True).values
        confidence = top[:, 0] - top[:, 1]
    if entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def reference_generate(
    model,
    prompt,
    *,
    max_new_tokens,
    steps,
    alg,
    temperature=0.0,
    top_p=None,
    top_k=None,
    alg_temp=None,
    eps=1e-3,
    seed=0,
):
    torch.manual_seed(seed)
    x = F.pad(torch.tensor([prompt]), (0, max_new_tokens), value=MASK)
    positions = torch.arange(x.shape[1])[None]
    grid = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == MASK
        logits = model(x, positions)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t, s = grid[i], grid[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index]) + MASK
            transfer = torch.rand(*x0.shape) < p_transfer
            _, x0[transfer] = published_sample_tokens(mask_logits[transfer], temperature, top_p, top_k)
            x[mask_index] = x0.clone()
            continue
        confidence, x0 = published_sample_tokens(
            mask_logits, temperature, top_p, top_k, margin=alg == "topk_margin", entropy=alg == "entropy"
        )
        num_mask = mask_index.sum() / mask_index.shape[0]
        count = int(num_mask * (1 - s / t)) if i < steps - 1 else int(num_mask)
        full = torch.full_like(x, -torch.inf, dtype=logits.dtype)
        full[mask_index] = confidence
        if count > 0:
            if alg_temp is None or alg_temp == 0:
                _, transfer_index = torch.topk(full, count)
            else:
                transfer_index = torch.multinomial(F.softmax(full / alg_temp, dim=-1), num_samples=count)
            x_ = torch.zeros_like(x) + MASK
            x_[mask_index] = x0.clone()
            rows = torch.arange(x.size(0)).unsqueeze(1).expand_as(transfer_index)
            x[rows, transfer_index] = x_[rows, transfer_index]
    return x[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    cfg = random_dream_config()
    weights = random_dream_weights(cfg, scale=0.3)
    # A trained model never predicts the mask token; random weights could (the published loop
    # would then leave a mask in its output). Its logit is 0, the median of the others.
    weights["lm_head.weight"][MASK] = 0.0
    path = write_dream_checkpoint(tmp_path_factory.mktemp("dream") / "m", cfg, weights)
    return load_model(path)


PROMPTS = [[1, 17, 40, 99, 23], [1, 230, 11], [1, 7, 8, 9, 10, 11, 12, 13, 200]]
CASES = {
    "maskgit-plus-1-per-step": dict(alg="maskgit_plus", steps=16, max_new_tokens=16),
    "maskgit-plus-fewer-steps": dict(alg="maskgit_plus", steps=5, max_new_tokens=16),
    "topk-margin": dict(alg="topk_margin", steps=8, max_new_tokens=12),
    "entropy": dict(alg="entropy", steps=12, max_new_tokens=12),
    "entropy-sampled": dict(alg="entropy", steps=8, max_new_tokens=16, temperature=0.7, top_p=0.9),
    "maskgit-top-k-sampled": dict(alg="maskgit_plus", steps=8, max_new_tokens=16, temperature=1.2, top_k=20),
    "alg-temp": dict(alg="maskgit_plus", steps=6, max_new_tokens=16, temperature=0.5, alg_temp=0.3),
    "origin": dict(alg="origin", steps=10, max_new_tokens=16),
    "origin-sampled": dict(alg="origin", steps=16, max_new_tokens=16, temperature=0.8, top_p=0.95),
    "eps": dict(alg="topk_margin", steps=7, max_new_tokens=14, eps=0.2),
}


def _overrides(opts: dict) -> dict:
    """Request fields for the same knobs (Dream's None is top_p 1.0, top_k 0, alg_temp 0)."""
    out = {
        k: v for k, v in opts.items() if k in ("steps", "temperature", "eps", "top_p", "top_k", "alg_temp")
    }
    return out


def _truncate_at_stop(tokens: list[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in (EOS, EOT):
            return tokens[:i]
    return tokens


@pytest.mark.parametrize("case", CASES)
def test_dream_presets_match_reference(loaded, case):
    opts = dict(CASES[case])
    alg, gen = opts.pop("alg"), opts["max_new_tokens"]
    engine = Engine(loaded, EngineConfig(max_batch_size=8))
    requests, expected = [], []
    for i, prompt in enumerate(PROMPTS):
        seed = 100 + i
        params = resolve_params(
            f"dream_{alg}",
            "dream",
            gen,
            {**_overrides(opts), "seed": seed, "early_stop": False},
            model_defaults=loaded.decode_defaults,
        )
        assert params.block_length == gen and params.shift_logits  # whole canvas, shifted logits
        requests.append(GenerationRequest(f"r{i}", prompt, params, gen))
        expected.append(reference_generate(loaded.model, prompt, alg=alg, seed=seed, **opts))
    results = engine.run_to_completion(requests)
    got = [results[f"r{i}"].token_ids for i in range(len(PROMPTS))]
    assert got == [_truncate_at_stop(e) for e in expected]
    assert any(len(g) > 3 for g in got)  # the comparison covers real generations, not instant stops


def test_counts_follow_the_published_arithmetic():
    # linspace(1, 1e-3, 5) = 1, 0.75025, 0.5005, 0.25075, 0.001: with 10 masked, step 0 commits
    # int(10 * 0.24975) = 2, step 2 int(10 * 0.49900) = 4 (truncated, not rounded); the last step all.
    assert [dream.transfer_count(10, i, 4, 1e-3) for i in range(4)] == [2, 3, 4, 10]
    assert dream.transfer_count(7, 0, 1, 1e-3) == 7
    assert float(dream.origin_probability(0, 4, 1e-3)) == pytest.approx(0.24975, abs=1e-6)
    assert dream.origin_probability(3, 4, 1e-3) == 1


def test_dream_parameters_are_validated():
    p = resolve_params("entropy", "dream", 40)
    assert (p.algorithm, p.rule, p.remasking, p.block_length, p.steps) == (
        "dream_entropy",
        "timestep",
        "entropy",
        40,
        40,
    )
    assert resolve_params("dream_origin", "dream", 40, {"block_length": 8}).num_blocks == 5
    for field, value in (("top_k", -1), ("alg_temp", -0.5), ("eps", 0.0), ("eps", 1.0)):
        with pytest.raises(ParamError) as err:
            resolve_params("dream_maskgit_plus", "dream", 16, {field: value})
        assert err.value.param == field
    with pytest.raises(ParamError) as err:
        resolve_params("dream_entropy", "dream", 16, {"max_steps_per_block": 4})
    assert err.value.param == "max_steps_per_block"
    with pytest.raises(ParamError, match="random"):
        resolve_params("dream_maskgit_plus", "dream", 16, {"remasking": "random"})
