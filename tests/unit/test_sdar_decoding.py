"""The ``sdar`` / ``sdar_static`` presets against a literal transcription of SDAR's published sampler.

``sdar_generate`` below transcribes ``block_diffusion_generate`` of JetAstra/SDAR's ``generate.py``
step by step: blocks of ``block_length`` at absolute positions (the prompt's last, partial block is
the first one decoded), ``denoising_steps`` per block with ``block_length`` split evenly over them
(the remainder to the first steps), ``low_confidence_static`` (the k most confident masked positions)
and ``low_confidence_dynamic`` (every masked position whose confidence exceeds the threshold when
there are at least k of them, else the k most confident), and the stop check after each block.

Two readings, both stated in docs/sdar.md: the published loop keeps a KV cache of finished blocks
(``store_kv``); here each step recomputes the canvas up to the block's end under SDAR's
block-causal mask, which gives the same keys and values. At temperature 0 (the published
sampler divides by the temperature) the token is the argmax and its confidence the softmax
probability of the raw logits, as SGLang and LMDeploy do. The transcription raises if ``topk`` ever
picks a position that is not masked (the published code would then overwrite a prompt or
committed token); the parameters below never trigger that.
"""

from __future__ import annotations

import pytest
import torch

from dllm_serve.config import EngineConfig
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.loader import LoadedModel, load_model
from tests.sdar_helpers import TINY_SDAR, random_sdar_config, random_sdar_weights, write_sdar_checkpoint

GEN = 24


def transfer_counts(block_length: int, steps: int) -> list[int]:
    """``get_num_transfer_tokens``: block_length // steps each, the remainder to the first steps."""
    base, remainder = divmod(block_length, steps)
    return [base + (1 if s < remainder else 0) for s in range(steps)]


@torch.no_grad()
def sdar_generate(
    model,
    prompt: list[int],
    mask_id: int,
    *,
    gen_length: int,
    block_length: int,
    denoising_steps: int,
    strategy: str,
    threshold: float,
    stop_ids: set[int],
) -> tuple[list[int], int]:
    """Generated tokens (cut at the first stop token) and the denoising forwards taken."""
    prompt_length = len(prompt)
    num_blocks = (prompt_length + gen_length + block_length - 1) // block_length
    total_length = num_blocks * block_length
    x = torch.full((total_length,), mask_id, dtype=torch.long)
    x[:prompt_length] = torch.tensor(prompt)
    q = torch.arange(total_length)
    block_mask = q[None, :] // block_length <= q[:, None] // block_length
    counts = transfer_counts(block_length, denoising_steps)
    forwards = 0
    for num_block in range(prompt_length // block_length, num_blocks):
        start, end = num_block * block_length, (num_block + 1) * block_length
        for step in range(denoising_steps + 1):
            cur_x = x[start:end]
            mask_index = cur_x == mask_id
            if mask_index.sum() == 0:
                break  # the published loop stores the block's K/V here
            ids = x[:end].clone()
            logits = model(ids[None], q[None, :end], block_mask[None, :end, :end])[0, start:end].float()
            forwards += 1
            probs = logits.softmax(-1)
            x0 = logits.argmax(-1)
            x0_p = probs.gather(-1, x0[:, None])[:, 0]
            confidence = torch.where(mask_index, x0_p, torch.tensor(-torch.inf))
            transfer = torch.zeros_like(mask_index)
            k = counts[step]
            high = confidence > threshold
            if strategy == "low_confidence_dynamic" and int(high.sum()) >= k:
                transfer = high
            else:  # low_confidence_static, or too few above the threshold
                _, idx = torch.topk(confidence, k)
                transfer[idx] = True
            if (transfer & ~mask_index).any():
                raise AssertionError(
                    "topk picked a position that is not masked (outside the faithful domain)"
                )
            cur_x[transfer] = x0[transfer]
        if any(int(t) in stop_ids for t in x[prompt_length:]):
            break
    out = x[prompt_length : prompt_length + gen_length].tolist()
    return next((out[:i] for i, t in enumerate(out) if t in stop_ids), out), forwards


@pytest.fixture(scope="module")
def random_sdar(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    cfg = random_sdar_config()
    path = tmp_path_factory.mktemp("sdar") / "m"
    return load_model(write_sdar_checkpoint(path, cfg, random_sdar_weights(cfg, scale=0.3)))


@pytest.fixture(scope="module")
def tiny_sdar() -> LoadedModel:
    return load_model(TINY_SDAR)


def _prompts(loaded: LoadedModel) -> list[list[int]]:
    """Chat prompts of several lengths (so the first block starts at each offset inside the prompt)."""
    texts = ["Copy the list: a b c", "Reverse: 1 2 3 4", "Sort: 9 3 7", "Add 12 and 30."]
    return [loaded.tokenizer.render_chat([{"role": "user", "content": t}]) for t in texts]


def _engine(loaded: LoadedModel, preset: str, prompts, overrides: dict) -> list[tuple[list[int], int]]:
    engine = Engine(loaded, EngineConfig(max_batch_size=8))
    requests = [
        GenerationRequest(
            f"r{i}", p, engine.resolve_params(GEN, {**overrides, "temperature": 0.0}, preset), GEN
        )
        for i, p in enumerate(prompts)
    ]
    results = engine.run_to_completion(requests)
    return [(results[f"r{i}"].token_ids, results[f"r{i}"].forwards) for i in range(len(prompts))]


CASES = [
    ("sdar_static", "low_confidence_static", {}, 4, 0.9),
    ("sdar", "low_confidence_dynamic", {}, 4, 0.9),
    ("sdar", "low_confidence_dynamic", {"threshold": 0.2}, 4, 0.2),
    ("sdar_static", "low_confidence_static", {"steps": GEN // 2}, 2, 0.9),
]


@pytest.mark.parametrize("model_name", ["random_sdar", "tiny_sdar"])
@pytest.mark.parametrize(("preset", "strategy", "overrides", "steps", "threshold"), CASES)
def test_presets_match_the_published_sampler(
    request, model_name, preset, strategy, overrides, steps, threshold
):
    loaded = request.getfixturevalue(model_name)
    prompts = _prompts(loaded)
    if steps == 2:  # 2 commits per step: an odd number of masks in the first block leaves the
        prompts = [p[: len(p) // 2 * 2] for p in prompts]  # faithful domain (see the docstring)
    assert {len(p) % 4 for p in prompts} != {0}  # some first blocks start inside the prompt
    stops = set(loaded.model.roles.stop_token_ids)
    expected = [
        sdar_generate(
            loaded.model,
            p,
            loaded.model.roles.mask_token_id,
            gen_length=GEN,
            block_length=4,
            denoising_steps=steps,
            strategy=strategy,
            threshold=threshold,
            stop_ids=stops,
        )
        for p in prompts
    ]
    got = _engine(loaded, preset, prompts, overrides)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]


def test_threshold_case_takes_the_dynamic_branch(random_sdar) -> None:
    """The low-threshold case commits several tokens in one step somewhere (else the dynamic rule
    would be indistinguishable from the static one above)."""
    prompts = _prompts(random_sdar)
    static = _engine(random_sdar, "sdar_static", prompts, {})
    dynamic = _engine(random_sdar, "sdar", prompts, {"threshold": 0.2})
    assert sum(f for _, f in dynamic) < sum(f for _, f in static)


def test_sdar_split_is_fixed_per_step() -> None:
    """SDAR's k per step comes from the block length and the step index only (not from the masks
    left): block 8 over 4 steps commits at least 2 at step 1 even when 3 masks remain, where the
    linear schedule over the steps left would ask for 1; more steps than tokens commit one each."""
    from dllm_serve.engine.sequence import sdar_share

    assert [sdar_share(8, 4, s) for s in range(4)] == transfer_counts(8, 4) == [2, 2, 2, 2]
    assert [sdar_share(4, 3, s) for s in range(3)] == transfer_counts(4, 3) == [2, 1, 1]
    assert [sdar_share(4, 8, s) for s in range(8)] == [1] * 8  # published: [1, 1, 1, 1, 0, 0, 0, 0]
