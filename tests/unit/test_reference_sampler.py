"""The `llada` preset reproduces the published LLaDA sampler step for step.

The reference below is written from the published algorithm (full canvas each step, semi-
autoregressive blocks, linear schedule with the remainder first, float64 Gumbel-max from the
global generator, low_confidence or random remasking, CFG, the two EOS options with the exact
effect of the published lines). It runs one prompt at a time; the engine runs all prompts in one
batch with different lengths. Random weights keep probabilities unsaturated, so confidence ties
(where the published top-k order is unspecified) occur only among positions whose token
confidence_eos_eot_inf banned (confidence 0); there the leftmost goes first, as in the engine.
One deliberate departure, the engine's and the reference's alike: the mask token is never chosen.
"""

from __future__ import annotations

import pytest
import torch

from dllm_serve.config import EngineConfig
from dllm_serve.engine.algorithms import resolve_params
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.loader import load_model
from tests.helpers import TINY_LLADA, random_llada_config, random_official_weights, write_llada_checkpoint

MASK, EOS, EOT = 5, 1, 4


def published_choice(
    logits: torch.Tensor,
    temperature: float,
    noise: torch.Tensor | None,
    *,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's tokens x0 and low_confidence scores, as ML-GSAI's ``generate`` computes them.

    Transcribed from the published lines, aliasing included: ``add_gumbel_noise`` returns its
    argument itself at temperature 0 and a float64 ``exp(logits) / (-log u)^T`` otherwise; the
    confidence option is the chained assignment ``noisy[EOS] = logits[EOT] = -inf`` after x0.
    ``logits`` is edited in place, as there.
    """
    if logits_eos_inf:
        logits[..., EOS] = -torch.inf
    noisy = logits.double().exp() / (-torch.log(noise)) ** temperature if temperature > 0 else logits
    # The one departure, the engine's too (decoding/sampling.py never_choosing): x0 is never the
    # mask token. The published line can pick it (random weights here do, under Gumbel noise), which
    # writes the mask back; a trained checkpoint gives it no probability.
    x0 = noisy.masked_fill(torch.arange(noisy.shape[-1]) == MASK, -torch.inf).argmax(-1)
    if confidence_eos_eot_inf:
        noisy[..., EOS] = logits[..., EOT] = -torch.inf
    return x0, torch.softmax(logits.float(), -1).gather(-1, x0[..., None]).squeeze(-1)


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
            noise = torch.rand_like(logits, dtype=torch.float64) if temperature > 0 else None
            x0, x0_p = published_choice(
                logits,
                temperature,
                noise,
                logits_eos_inf=logits_eos_inf,
                confidence_eos_eot_inf=confidence_eos_eot_inf,
            )
            if remasking == "random":
                x0_p = torch.rand(x0.shape)
            x0_p[:, end:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-torch.inf))
            # torch.topk; among equal confidences (banned tokens all score 0) the leftmost first,
            # the order the engine documents (topk leaves it unspecified).
            chosen = torch.sort(confidence[0], descending=True, stable=True).indices[: schedule[i]]
            x[0, chosen] = x0[0, chosen]
    return x[0, len(prompt) :].tolist()


def test_published_choice_hand_cases() -> None:
    """Vocabulary of 6 (EOS 1, EOT 4), logits log(weights): probabilities are weights / sum."""
    weights = torch.tensor(
        [
            [1.0, 4.0, 1.0, 1.0, 2.0, 1.0],  # EOS wins: 4/10
            [3.0, 1.0, 1.0, 1.0, 4.0, 2.0],  # EOT wins: 4/12
            [3.0, 2.0, 1.0, 1.0, 2.0, 1.0],  # token 0 wins: 3/10
        ]
    )

    def run(temperature, **opts):
        # u = exp(-1) makes (-log u)^T = 1: the noisy argmax equals the plain one, by hand.
        noise = torch.full((3, 6), torch.e**-1, dtype=torch.float64)
        x0, conf = published_choice(weights.log(), temperature, noise, **opts)
        return x0.tolist(), [round(c, 4) for c in conf.tolist()]

    assert run(0.0) == ([1, 4, 0], [0.4, 0.3333, 0.3])
    # Temperature 0: EOS and EOT both leave the confidence (4 and 2 of 10; 1 and 4 of 12).
    assert run(0.0, confidence_eos_eot_inf=True) == ([1, 4, 0], [0.0, 0.0, 0.5])
    # Temperature > 0: EOS is banned in the noisy copy only, after x0; EOT leaves the confidence.
    assert run(1.0, confidence_eos_eot_inf=True) == ([1, 4, 0], [0.5, 0.0, 0.375])
    # logits_eos_inf bans EOS from the tokens themselves: row 0 picks EOT (2 of 6 left).
    assert run(0.0, logits_eos_inf=True) == ([4, 4, 0], [0.3333, 0.3636, 0.375])


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    cfg = random_llada_config(n_layers=2, d_model=64, n_kv_heads=2)
    path = write_llada_checkpoint(
        tmp_path_factory.mktemp("ref") / "m", cfg, random_official_weights(cfg, scale=0.3)
    )
    return load_model(path)


@pytest.fixture(scope="module")
def eos_heavy(tmp_path_factory):
    """Random weights whose LM head favours EOS and EOT: each is the argmax at some positions, so
    the EOS/EOT options change which positions commit first."""
    cfg = random_llada_config(n_layers=2, d_model=64, n_kv_heads=2)
    weights = random_official_weights(cfg, seed=0, scale=0.3)
    head = weights["model.transformer.ff_out.weight"]
    head[EOS] *= 5.0
    head[EOT] *= 5.0
    return load_model(write_llada_checkpoint(tmp_path_factory.mktemp("eos") / "m", cfg, weights))


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
# confidence_eos_eot_inf alone, where EOS and EOT win positions: its effect differs by temperature.
EOS_CASES = {
    "confidence-eos-eot-inf-argmax": dict(
        steps=16, gen_length=16, block_length=8, confidence_eos_eot_inf=True
    ),
    "confidence-eos-eot-inf-uneven": dict(
        steps=6, gen_length=16, block_length=16, confidence_eos_eot_inf=True
    ),
    "confidence-eos-eot-inf-gumbel": dict(
        steps=16, gen_length=16, block_length=8, temperature=0.7, confidence_eos_eot_inf=True
    ),
    "confidence-eos-eot-inf-hot": dict(
        steps=8, gen_length=16, block_length=8, temperature=2.0, confidence_eos_eot_inf=True
    ),
}


def _truncate_at_stop(tokens: list[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in (EOS, EOT):
            return tokens[:i]
    return tokens


def _check_against_reference(model, opts: dict) -> None:
    opts = dict(opts)
    gen_length = opts.pop("gen_length")
    engine = Engine(model, EngineConfig(max_batch_size=8))
    requests, expected = [], []
    for i, prompt in enumerate(PROMPTS):
        seed = 100 + i
        params = resolve_params("llada", "llada", gen_length, {**opts, "seed": seed, "early_stop": False})
        requests.append(GenerationRequest(f"r{i}", prompt, params, gen_length))
        expected.append(reference_generate(model.model, prompt, gen_length=gen_length, seed=seed, **opts))
    results = engine.run_to_completion(requests)
    for i, want in enumerate(expected):
        got = results[f"r{i}"]
        assert got.token_ids == _truncate_at_stop(want), f"prompt {i}"
        assert got.forwards == opts["steps"] * (2 if opts.get("cfg_scale") else 1)
        assert got.finish_reason == ("stop" if len(_truncate_at_stop(want)) < gen_length else "length")


@pytest.mark.parametrize("case", sorted(CASES))
def test_llada_preset_matches_reference(loaded, case):
    _check_against_reference(loaded, CASES[case])


@pytest.mark.parametrize("case", sorted(EOS_CASES))
def test_confidence_eos_eot_inf_alone_matches_reference(eos_heavy, case):
    """The option alone, with EOS and EOT winning positions (checked first): reverting the engine
    to "EOT only at every temperature" or "EOS and EOT at every temperature" fails the argmax or
    the Gumbel cases."""
    for prompt in PROMPTS:
        n = len(prompt) + 16
        x = torch.tensor(prompt + [MASK] * 16)[None]
        winners = set(eos_heavy.model(x, torch.arange(n)[None])[0, len(prompt) :].argmax(-1).tolist())
        assert {EOS, EOT} <= winners
    _check_against_reference(eos_heavy, EOS_CASES[case])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_confidence_eos_eot_inf_alone_on_the_bundled_model(temperature):
    """The trained tiny model predicts EOT then EOS after its answers, so the option changes the
    commit order there. Expected tokens come from the reference on the fly (any retrained weights)."""
    tiny = load_model(TINY_LLADA)
    assert (tiny.model.roles.mask_token_id, tiny.model.roles.eos_token_id, tiny.tokenizer.end_of_turn_id) == (
        MASK,
        EOS,
        EOT,
    )
    texts = ["Copy the list: a b c d e f g h", "Upper-case the list: a b c d e f"]
    opts = dict(steps=32, block_length=16, temperature=temperature, confidence_eos_eot_inf=True)
    engine = Engine(tiny, EngineConfig(max_batch_size=4))
    requests, expected = [], []
    for i, text in enumerate(texts):
        prompt = tiny.tokenizer.render_chat([{"role": "user", "content": text}])
        params = resolve_params("llada", "llada", 32, {**opts, "seed": 7 + i, "early_stop": False})
        requests.append(GenerationRequest(f"r{i}", prompt, params, 32))
        expected.append(reference_generate(tiny.model, prompt, gen_length=32, seed=7 + i, **opts))
    results = engine.run_to_completion(requests)
    for i, want in enumerate(expected):
        assert results[f"r{i}"].token_ids == _truncate_at_stop(want), i
