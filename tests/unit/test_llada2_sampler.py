"""LLaDA2.0's and LLaDA2.1's published ``generate`` transcribed literally, run side by side with the
engine's ``llada2`` presets at temperature 0: the same tokens, step for step.

``llada20_generate`` follows ``modeling_llada2_moe.py`` (LLaDA2.0): blocks of ``block_length``
counted from position 0 over prompt + ``gen_length`` rounded up to whole blocks, a block-causal
mask over everything (the prompt included), decoding from the block that holds the prompt's end,
each step the full window up to the active block's end, per-step transfer counts from the
``steps`` schedule, a threshold on the chosen token's probability (strictly above), else the
top-k; a block whose generated part holds EOS ends generation; the output is cut after the first
EOS. ``llada21_generate`` follows LLaDA2.1's: one commit at least per step, and token editing of
the block's decoded, non-prompt positions whose new token's probability is above
``editing_threshold``, for at most ``max_post_steps`` forwards after the last mask is filled.

The engine runs the same model with its block-aligned committed-context KV cache; the reference
recomputes the window every step, as published.
"""

from __future__ import annotations

import pytest
import torch

from dllm_serve.config import EngineConfig
from dllm_serve.engine.algorithms import ParamError, resolve_params
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.loader import load_model
from tests.llada2_helpers import random_llada2_config, random_llada2_weights, write_llada2_checkpoint

GEN = 64
BLOCK = 32
PROMPTS = [[5, 17, 40, 99, 23], list(range(10, 41)), list(range(50, 82)), list(range(100, 141))]


def block_causal(n_blocks: int, block: int) -> torch.Tensor:
    blocks = torch.tril(torch.ones(n_blocks, n_blocks, dtype=torch.bool))
    return blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)


def transfer_schedule(block: int, steps: int) -> list[int]:
    base, rem = divmod(block, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def _window(model, x: torch.Tensor, mask: torch.Tensor, end: int, block: int, mask_id: int):
    logits = model(x[None, :end], torch.arange(end)[None], mask[None, :end, :end])[0, -block:]
    # The one departure from the published loops, the engine's too (decoding/step.py): the mask
    # token is never chosen. These random weights do predict it at a few positions; the published
    # loop would write it back (the position stays masked), a trained checkpoint never predicts it.
    x0 = logits.masked_fill(torch.arange(logits.shape[-1]) == mask_id, -torch.inf).argmax(-1)
    return x0, torch.softmax(logits, -1).gather(-1, x0[:, None]).squeeze(-1)


def llada20_generate(model, prompt, *, gen_length, block_length, steps, threshold, eos_id, mask_id):
    """LLaDA2.0's generate at temperature 0 (eos_early_stop False, minimal_topk 1)."""
    steps = min(steps, gen_length)
    p = len(prompt)
    n_blocks = (p + gen_length + block_length - 1) // block_length
    mask = block_causal(n_blocks, block_length)
    x = torch.full((n_blocks * block_length,), mask_id)
    x[:p] = torch.tensor(prompt)
    schedule = transfer_schedule(block_length, steps)
    for nb in range(p // block_length, n_blocks):
        end = (nb + 1) * block_length
        for step in range(steps):
            active = x[end - block_length : end] == mask_id
            if not active.any():
                break
            x0, x0_p = _window(model, x, mask, end, block_length, mask_id)
            confidence = torch.where(active, x0_p, torch.tensor(-torch.inf))
            high = confidence > threshold
            transfer = torch.zeros_like(active)
            if int(high.sum()) >= schedule[step]:
                transfer = high
            else:
                idx = torch.topk(confidence, k=min(schedule[step], int(active.sum()))).indices
                transfer[idx] = True
            x[end - block_length : end][transfer] = x0[transfer]
        if (x[p:end] == eos_id).any():
            break
    out = x[p : p + gen_length].tolist()
    return out[: out.index(eos_id) + 1] if eos_id in out else out


def llada21_generate(
    model, prompt, *, gen_length, block_length, threshold, editing_threshold, max_post_steps, eos_id, mask_id
):
    """LLaDA2.1's generate at temperature 0 (num_to_transfer 1); editing_threshold None: no edits."""
    p = len(prompt)
    n_blocks = (p + gen_length + block_length - 1) // block_length
    mask = block_causal(n_blocks, block_length)
    x = torch.full((n_blocks * block_length,), mask_id)
    x[:p] = torch.tensor(prompt)
    edits = 0
    for nb in range(p // block_length, n_blocks):
        end = (nb + 1) * block_length
        start = nb * block_length
        post_steps = 0
        while True:
            old = x[start:end].clone()
            active = old == mask_id
            if not active.any():
                post_steps += 1
            if post_steps > max_post_steps:
                break
            in_prompt = torch.arange(start, end) < p
            x0, x0_p = _window(model, x, mask, end, block_length, mask_id)
            mask_transfer = torch.zeros_like(active)
            if active.any():
                confidence = torch.where(active, x0_p, torch.tensor(-torch.inf))
                high = (confidence > threshold) & active
                if int(high.sum()) >= 1:
                    mask_transfer = high
                else:
                    mask_transfer[torch.topk(confidence, k=1).indices] = True
            edit = torch.zeros_like(active)
            if editing_threshold is not None:
                edit = ~active & ~in_prompt & (x0_p > editing_threshold) & (x0 != old)
            edits += int(edit.sum())
            final = mask_transfer | edit
            x[start:end][final] = x0[final]
            if not active.any() and not edit.any():
                break
    out = x[p : p + gen_length].tolist()
    return (out[: out.index(eos_id) + 1] if eos_id in out else out), edits


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    cfg = random_llada2_config(max_position_embeddings=512)
    path = write_llada2_checkpoint(
        tmp_path_factory.mktemp("llada2s"), cfg, random_llada2_weights(cfg, scale=0.5)
    )
    return load_model(path)


def _engine(loaded, preset: str, overrides: dict, prompts=PROMPTS) -> list[list[int]]:
    requests = [
        GenerationRequest(f"r{i}", pr, resolve_params(preset, "llada2", GEN, overrides), GEN)
        for i, pr in enumerate(prompts)
    ]
    results = Engine(loaded, EngineConfig(max_batch_size=8)).run_to_completion(requests)
    return [results[f"r{i}"].token_ids for i in range(len(prompts))]


def _cut(tokens: list[int], stops) -> list[int]:
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


@pytest.mark.parametrize("threshold", [0.95, 0.2])
def test_llada20_preset_matches_the_published_generate(loaded, threshold):
    roles = loaded.model.roles
    stops = set(Engine(loaded).runner.stop_ids)
    expected = [
        _cut(
            llada20_generate(
                loaded.model,
                pr,
                gen_length=GEN,
                block_length=BLOCK,
                steps=BLOCK,
                threshold=threshold,
                eos_id=roles.eos_token_id,
                mask_id=roles.mask_token_id,
            ),
            stops,
        )
        for pr in PROMPTS
    ]
    assert _engine(loaded, "llada2", {"threshold": threshold}) == expected


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("llada2_quality", {}),
        ("llada2_speed", {}),
        ("llada2_quality", {"threshold": 0.3, "editing_threshold": 0.05, "max_post_steps": 3}),
        ("llada2_quality", {"threshold": 0.3, "editing_threshold": 0.05, "max_post_steps": 0}),
    ],
)
def test_llada21_presets_match_the_published_generate(loaded, preset, overrides):
    roles = loaded.model.roles
    params = resolve_params(preset, "llada2", GEN, overrides)
    stops = set(Engine(loaded).runner.stop_ids)
    expected, edits = [], 0
    for pr in PROMPTS:
        tokens, n = llada21_generate(
            loaded.model,
            pr,
            gen_length=GEN,
            block_length=BLOCK,
            threshold=params.threshold,
            editing_threshold=params.editing_threshold,
            max_post_steps=params.max_post_steps,
            eos_id=roles.eos_token_id,
            mask_id=roles.mask_token_id,
        )
        expected.append(_cut(tokens, stops))
        edits += n
    if overrides.get("editing_threshold"):
        assert edits > 0  # the case exercises editing
    assert _engine(loaded, preset, overrides) == expected


def test_prompt_relative_blocks_would_fail_the_comparison(loaded):
    """Blocks counted from the prompt's end (the Nemotron plan) decode differently: the comparison
    above can tell an engine that lost LLaDA2's alignment."""
    roles = loaded.model.roles
    pr = PROMPTS[0]
    shifted = [roles.mask_token_id] * 0 + pr
    aligned = llada20_generate(
        loaded.model,
        shifted,
        gen_length=GEN,
        block_length=BLOCK,
        steps=BLOCK,
        threshold=0.95,
        eos_id=roles.eos_token_id,
        mask_id=roles.mask_token_id,
    )
    # The same prompt decoded with the prompt as its own block (prompt-relative layout) differs.
    requests = [GenerationRequest("r", pr, resolve_params("llada2", "llada2", GEN, {}), GEN)]
    engine = Engine(loaded, EngineConfig(max_batch_size=1))
    got = engine.run_to_completion(requests)["r"].token_ids
    stops = set(engine.runner.stop_ids)
    assert got == _cut(aligned, stops)
    relative = _relative_reference(loaded.model, pr, roles)
    assert _cut(relative, stops) != got


def _relative_reference(model, prompt, roles) -> list[int]:
    """One block of 32 after a bidirectional prompt, threshold 0.95 (what a prompt-relative plan does)."""
    p = len(prompt)
    x = torch.tensor(prompt + [roles.mask_token_id] * BLOCK)
    n = x.shape[0]
    vis = torch.ones(n, n, dtype=torch.bool)
    vis[:p, p:] = False
    while (x[p:] == roles.mask_token_id).any():
        x0, x0_p = _window(model, x, vis, n, BLOCK, roles.mask_token_id)
        active = x[p:] == roles.mask_token_id
        conf = torch.where(active, x0_p, torch.tensor(-torch.inf))
        pick = conf > 0.95
        if not pick.any():
            pick[conf.argmax()] = True
        x[p:][pick] = x0[pick]
    return x[p:].tolist()


def test_editing_needs_a_llada2_preset():
    with pytest.raises(ParamError) as err:
        resolve_params("nemotron", "nemotron", 32, {"editing_threshold": 0.5})
    assert err.value.param == "editing_threshold"
    with pytest.raises(ParamError):
        resolve_params("llada2_quality", "llada2", 32, {"max_post_steps": -1})


def test_batch_invariance_float32_with_moe_routing(loaded):
    """A request's tokens (and forwards) are the same alone and in a batch mixing every LLaDA2 preset,
    temperatures and canvas lengths: MoE routing does not depend on the batch."""
    requests = []
    for i, preset in enumerate(("llada2", "llada2_quality", "llada2_speed")):
        for j, temperature in enumerate((0.0, 0.8)):
            max_tokens = (40, 64)[(i + j) % 2]
            params = resolve_params(
                preset, "llada2", max_tokens, {"temperature": temperature, "seed": 7 * i + j}
            )
            requests.append(
                GenerationRequest(f"{preset}-{j}", PROMPTS[(i + j) % len(PROMPTS)], params, max_tokens)
            )
    together = Engine(loaded, EngineConfig(max_batch_size=len(requests))).run_to_completion(requests)
    for req in requests:
        alone = Engine(loaded, EngineConfig(max_batch_size=1)).run_to_completion([req])[req.request_id]
        assert together[req.request_id].token_ids == alone.token_ids, req.request_id
        assert together[req.request_id].forwards == alone.forwards, req.request_id


def test_remote_generate_gets_the_llada2_knobs():
    """Under --trust-remote-code a LLaDA2.1 checkpoint's own generate() receives the preset's
    block_length, steps, threshold and editing knobs by name; LLaDA2.0's (no editing) does not."""
    from dllm_serve.engine.remote import generate_kwargs

    def generate21(
        inputs,
        temperature=0.0,
        block_length=32,
        steps=32,
        gen_length=2048,
        top_p=None,
        top_k=None,
        eos_early_stop=False,
        minimal_topk=1,
        threshold=0.95,
        editing_threshold=0.9,
        max_post_steps=16,
        eos_id=156892,
        mask_id=156895,
        num_to_transfer=1,
    ): ...

    quality = resolve_params("llada2_quality", "llada2", 64, {})
    kwargs = generate_kwargs(generate21, quality, 64)
    assert kwargs["editing_threshold"] == 0.5 and kwargs["max_post_steps"] == 16
    assert (kwargs["threshold"], kwargs["block_length"], kwargs["gen_length"]) == (0.7, 32, 64)
    speed = generate_kwargs(generate21, resolve_params("llada2_speed", "llada2", 64, {}), 64)
    assert "editing_threshold" not in speed and speed["threshold"] == 0.5
