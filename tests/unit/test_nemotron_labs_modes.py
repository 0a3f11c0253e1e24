"""Nemotron-Labs-Diffusion's three generation modes against literal transcriptions of the published
``generate`` (block diffusion), ``ar_generate`` and ``linear_spec_generate`` (the checkpoint's
modeling code; docs/nemotron-labs.md), at temperature 0 on a random checkpoint.

The transcriptions recompute every forward from scratch with an explicit attention mask (no KV
cache), so the engine's cache, batching and phase bookkeeping are all under test. One
generalisation: the published loops take one ``eos_token_id``; here the stop set is the engine's
(eos and end-of-turn), checked with ``in`` where the published code checks ``==``.
"""

from __future__ import annotations

import pytest
import torch

from dllm_serve.config import EngineConfig
from dllm_serve.engine import causal_modes
from dllm_serve.engine.algorithms import ParamError, resolve_params
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.scoring import ScoringRequest, TokenLogprobRequest
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.loader import load_model
from tests.nemotron_labs_helpers import random_labs_config, random_labs_weights, write_labs_checkpoint

BLOCK = 8


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    cfg = random_labs_config(block_size=BLOCK)
    # Larger weights make confident, varied predictions, so several positions commit per step.
    tensors = random_labs_weights(cfg, seed=3, scale=0.6)
    # A random head may rank the mask token first, which leaves positions masked in the published
    # loops; a trained model never predicts it. A zero row keeps its logit (0) far below the top.
    tensors["diffusion_head.weight"][cfg.mask_token_id] = 0.0
    return load_model(write_labs_checkpoint(tmp_path_factory.mktemp("labs"), cfg, tensors))


class Reference:
    """Forwards of the published loops, recomputed without a cache."""

    def __init__(self, loaded) -> None:
        self.model = loaded.model
        self.mask = loaded.model.roles.mask_token_id
        self.stops = set(loaded.tokenizer.stop_ids(loaded.model.roles.eos_token_id))

    def logits(self, tokens: list[int], bidirectional_tail: int = 0) -> torch.Tensor:
        """[len, V]: causal attention, except the last ``bidirectional_tail`` queries see the whole span."""
        n = len(tokens)
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        if bidirectional_tail:
            mask[n - bidirectional_tail :] = True
        with torch.no_grad():
            return self.model(torch.tensor([tokens]), torch.arange(n)[None], mask[None])[0].float()

    def generate(
        self, prompt: list[int], max_new: int, block: int, threshold: float
    ) -> tuple[list[int], int]:
        """``generate(..., causal_context=True)``: returns the generated ids and the forwards the
        engine takes for them (prefill + denoising steps + one causal commit per later block)."""
        x = list(prompt)
        next_token = int(self.logits(x)[-1].argmax())
        steps = blocks = 0
        for _ in range(max_new // block):
            blocks += 1
            cur = [next_token] + [self.mask] * (block - 1)
            for _ in range(block):  # steps_per_block = block_length
                masked = [t == self.mask for t in cur]
                if not any(masked):
                    break
                steps += 1
                lg = self.logits(x + cur, bidirectional_tail=block)[-block:]
                p = lg.softmax(-1)
                x0 = lg.argmax(-1)
                conf = [float(p[i, x0[i]]) if masked[i] else float("-inf") for i in range(block)]
                ranked = sorted(range(block), key=lambda i: -conf[i])[: sum(masked)]
                chosen = ranked[:1] + [i for i in ranked[1:] if conf[i] >= threshold]
                for i in chosen:
                    cur[i] = int(x0[i])
                stop_at = next((i for i, t in enumerate(cur) if t in self.stops), None)
                if stop_at is not None and self.mask not in cur[:stop_at]:
                    break
            x += cur
            generated = x[len(prompt) :]
            if any(t in self.stops for t in generated):
                return generated, 1 + steps + blocks - 1
            next_token = int(self.logits(x)[-1].argmax())  # the post-block causal forward
        return x[len(prompt) :], 1 + steps + blocks - 1

    def ar_generate(self, prompt: list[int], max_new: int) -> tuple[list[int], int]:
        """Plain greedy causal decoding (``ar_generate``): one forward per generated token."""
        out: list[int] = []
        for _ in range(max_new):
            token = int(self.logits(prompt + out)[-1].argmax())
            out.append(token)
            if token in self.stops:
                break
        return out, len(out)

    def linear_spec_generate(
        self, prompt: list[int], max_new: int, block: int, threshold: float = 0.0
    ) -> tuple[list[int], int]:
        """``linear_spec_generate``: draft a block bidirectionally, verify causally, accept the
        agreeing prefix plus the causal prediction after it."""
        next_token = int(self.logits(prompt)[-1].argmax())
        nfe = 1
        if next_token in self.stops:
            return [next_token], nfe
        generated = [next_token]
        while len(generated) < max_new:
            context = prompt + generated[:-1]
            cur = [next_token] + [self.mask] * (block - 1)
            while True:
                masked = [t == self.mask for t in cur]
                if not any(masked):
                    break
                lg = self.logits(context + cur, bidirectional_tail=block)[-block:]
                nfe += 1
                draft = lg.argmax(-1).tolist()
                if threshold > 0:
                    p = lg.softmax(-1)
                    conf = [float(p[i, draft[i]]) if masked[i] else float("-inf") for i in range(block)]
                    take = [conf[i] >= threshold for i in range(block)]
                    if not any(take):
                        take[max(range(block), key=lambda i: conf[i])] = True
                    cur = [draft[i] if take[i] else cur[i] for i in range(block)]
                else:
                    cur = [draft[i] if masked[i] else cur[i] for i in range(block)]
                    break
            ar = self.logits(context + cur)[-block:].argmax(-1).tolist()
            nfe += 1
            accepted = 1
            for i in range(block - 1):
                if ar[i] != cur[i + 1]:
                    break
                accepted += 1
            new = ar[:accepted]
            next_token = new[-1]
            stop_at = next((i for i, t in enumerate(new) if t in self.stops), None)
            if stop_at is not None:
                generated += new[: stop_at + 1]
                break
            generated += new
        return generated, nfe


def run(loaded, algorithm: str, prompts: list[list[int]], max_new: int, **overrides):
    engine = Engine(loaded, EngineConfig(device="cpu", dtype="float32", max_batch_size=8))
    params = resolve_params(
        algorithm, "nemotron-labs", max_new, overrides, model_defaults=loaded.decode_defaults
    )
    requests = [GenerationRequest(f"r{i}", p, params, max_new) for i, p in enumerate(prompts)]
    return [engine.run_to_completion(requests)[r.request_id] for r in requests]


def cut(tokens: list[int], stops: set[int], limit: int) -> list[int]:
    """The text the engine returns: up to the first stop token, at most ``limit`` tokens."""
    stop_at = next((i for i, t in enumerate(tokens) if t in stops), None)
    return tokens[: stop_at if stop_at is not None else limit][:limit]


def prompts(loaded, n: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    vocab = loaded.model.vocab_size
    return [torch.randint(5, vocab, (6 + 5 * i,), generator=gen).tolist() for i in range(n)]


@pytest.mark.parametrize("threshold", [0.9, 0.3])
def test_diffusion_matches_published_generate(loaded, threshold):
    ref = Reference(loaded)
    ps = prompts(loaded)
    max_new = 4 * BLOCK
    results = run(loaded, "nemotron_labs", ps, max_new, threshold=threshold)
    for prompt, result in zip(ps, results, strict=True):
        tokens, forwards = ref.generate(prompt, max_new, BLOCK, threshold)
        assert result.token_ids == cut(tokens, ref.stops, max_new)
        assert result.forwards == forwards


def test_ar_preset_is_plain_greedy_causal_decoding(loaded):
    ref = Reference(loaded)
    ps = prompts(loaded)
    results = run(loaded, "ar", ps, 20)
    for prompt, result in zip(ps, results, strict=True):
        tokens, forwards = ref.ar_generate(prompt, 20)
        assert result.token_ids == cut(tokens, ref.stops, 20)
        assert result.forwards == forwards


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_speculative_matches_published_linear_spec_and_equals_ar(loaded, threshold):
    ref = Reference(loaded)
    ps = prompts(loaded)
    max_new = 3 * BLOCK + 3
    results = run(loaded, "linear_spec", ps, max_new, threshold=threshold)
    ar = run(loaded, "ar", ps, max_new)
    for prompt, result, greedy in zip(ps, results, ar, strict=True):
        tokens, nfe = ref.linear_spec_generate(prompt, max_new, BLOCK, threshold)
        assert result.token_ids == cut(tokens, ref.stops, max_new)
        assert result.forwards == nfe
        assert result.token_ids == greedy.token_ids  # lossless at temperature 0


def test_acceptance_rule():
    draft = torch.tensor([7, 1, 2, 3, 4])
    assert causal_modes.accepted_length(draft, torch.tensor([1, 2, 9, 4, 5])) == 3
    assert causal_modes.accepted_length(draft, torch.tensor([9, 2, 3, 4, 5])) == 1
    assert causal_modes.accepted_length(draft, torch.tensor([1, 2, 3, 4, 5])) == 5


def test_presets_and_their_errors(loaded):
    defaults = loaded.decode_defaults
    p = resolve_params("dlm", "nemotron-labs", 40, model_defaults=defaults)
    assert (p.algorithm, p.cache, p.block_length, p.threshold, p.max_steps_per_block) == (
        "nemotron_labs",
        "causal",
        BLOCK,
        0.9,
        BLOCK,
    )
    assert resolve_params("linear_spec", "nemotron-labs", 40).threshold == 0.0
    with pytest.raises(ParamError, match="shift_logits"):
        resolve_params("ar", "nemotron-labs", 40, {"shift_logits": True})
    with pytest.raises(ParamError, match="cannot run on a nemotron-labs model"):
        resolve_params("dual_cache", "nemotron-labs", 40)


def _score(engine: Engine, requests: list) -> dict:
    out: dict = {}
    for r in requests:
        engine.add_scoring(r, lambda e: out.__setitem__(e.request_id, e))
    while engine.step():
        pass
    return out


def test_likelihood_is_the_exact_autoregressive_one(loaded):
    """/v1/loglikelihood and echo on this family: each continuation token's log-softmax at the
    position before it under causal attention, summed; greedy when each is the argmax there."""
    ref = Reference(loaded)
    context, continuation = prompts(loaded, 2)
    logp = ref.logits(context + continuation).log_softmax(-1)
    expected = [float(logp[len(context) + i - 1, t]) for i, t in enumerate(continuation)]
    greedy = [int(logp[len(context) - 1].argmax())]
    engine = Engine(loaded, EngineConfig(device="cpu", dtype="float32"))
    assert engine.causal_scoring and not engine.block_diffusion
    events = _score(
        engine,
        [
            ScoringRequest("a", context, continuation, mc_num=7, causal=True, check_greedy=True),
            ScoringRequest("b", context, greedy, causal=True, check_greedy=True),
            TokenLogprobRequest("c", context + continuation, top_k=2, generate=1, causal=True),
        ],
    )
    a, b, c = events["a"], events["b"], events["c"]
    assert a.logprob == pytest.approx(sum(expected), abs=1e-4) and a.stderr == 0.0 and a.forwards == 1
    assert a.is_greedy is False and b.is_greedy is True
    assert c.tokens[0] is None
    for i, t in enumerate(continuation):
        entry = c.tokens[len(context) + i]
        assert entry.token == t and entry.logprob == pytest.approx(expected[i], abs=1e-4)
    full = ref.logits(context + continuation)[-1]
    assert c.generated[0].token == int(full.argmax())


@pytest.mark.parametrize("algorithm", ["ar", "linear_spec"])
def test_generated_token_logprobs_are_the_causal_ones(loaded, algorithm):
    """``logprobs`` on the AR and speculative modes: each token's log-probability in the causal
    forward that committed it, i.e. the log-softmax at the position before it."""
    ref = Reference(loaded)
    prompt = prompts(loaded, 1)[0]
    engine = Engine(loaded, EngineConfig(device="cpu", dtype="float32"))
    params = resolve_params(algorithm, "nemotron-labs", 20, model_defaults=loaded.decode_defaults)
    events = []
    engine.add_request(GenerationRequest("r", prompt, params, 20, logprobs=2), events.append)
    while engine.step():
        pass
    tokens = [t for e in events for t in e.token_ids]
    entries = [x for e in events for x in (e.logprobs or [])]
    assert tokens and len(entries) == len(tokens)
    logp = ref.logits(prompt + tokens).log_softmax(-1)
    for i, (token, entry) in enumerate(zip(tokens, entries, strict=True)):
        assert entry.token == token and len(entry.top) == 2
        assert entry.logprob == pytest.approx(float(logp[len(prompt) + i - 1, token]), abs=1e-4)
