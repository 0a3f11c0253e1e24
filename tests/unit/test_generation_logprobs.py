"""Log-probabilities of generated tokens: the model's distribution at the forward that committed
each token, before temperature. Expected values are computed from the model, never hard-coded."""

from __future__ import annotations

import pytest
import torch

from dllm_serve.bench.tasks import heldout_examples
from dllm_serve.config import EngineConfig
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.loader import load_model
from tests.helpers import TINY_LLADA
from tests.likelihood_reference import block_causal
from tests.nemotron_helpers import TINY_NEMOTRON

FAMILIES = {"llada": (TINY_LLADA, "llada"), "nemotron": (TINY_NEMOTRON, "nemotron")}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    path, preset = FAMILIES[request.param]
    return load_model(path), preset


def _request(engine: Engine, loaded, preset: str, rid: str, k: int | None, **overrides) -> GenerationRequest:
    prompt = loaded.tokenizer.render_chat([{"role": "user", "content": heldout_examples(1)[0].prompt}])
    opts = {"block_length": 8, "steps": 1, "temperature": 2.0, "seed": 3, **overrides}
    return GenerationRequest(rid, prompt, engine.resolve_params(8, opts, preset), 8, logprobs=k)


def test_every_token_committed_in_one_forward_has_that_forward_s_untempered_logprob(family):
    """steps 1: the whole 8-token block is committed from the fully masked canvas in one forward,
    so each token's entry is the log-softmax of a direct forward of prompt + 8 masks, at temperature 2."""
    loaded, preset = family
    engine = Engine(loaded, EngineConfig())
    req = _request(engine, loaded, preset, "a", 3, early_stop=False, logits_eos_inf=True)
    tokens: list[int] = []
    events_lp = []

    def collect(event) -> None:
        tokens.extend(event.token_ids)
        events_lp.extend(event.logprobs or [])

    engine.scheduler.submit(req, collect)
    while engine.step():
        pass
    model = loaded.model
    c = len(req.prompt_ids)
    ids = torch.tensor(req.prompt_ids + [model.roles.mask_token_id] * 8)
    mask = None if preset == "llada" else block_causal(c, 0, 8, 8)[None]
    logp = torch.log_softmax(model(ids[None], torch.arange(c + 8)[None], mask).float()[0, c:], -1)
    assert len(events_lp) == len(tokens) > 0
    for i, (token, entry) in enumerate(zip(tokens, events_lp, strict=True)):
        assert entry.token == token
        assert entry.logprob == pytest.approx(float(logp[i, token]), abs=1e-4)
        top_ids = [t for t, _ in entry.top]
        assert top_ids == logp[i].topk(3).indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(logp[i].topk(3).values.tolist(), abs=1e-4)


def test_logprobs_do_not_depend_on_the_batch_and_are_off_unless_asked(family):
    loaded, preset = family
    engine = Engine(loaded, EngineConfig())
    req = _request(engine, loaded, preset, "a", 2, steps=8, temperature=0.0)
    other = _request(engine, loaded, preset, "b", None, steps=4, temperature=1.0)
    alone: dict[str, list] = {}
    together: dict[str, list] = {}
    for requests, out in (([req], alone), ([req, other], together)):
        e = Engine(loaded, EngineConfig())
        for r in requests:
            e.scheduler.submit(r, lambda ev, out=out: out.setdefault(ev.request_id, []).append(ev.logprobs))
        while e.step():
            pass
    assert together["a"] == alone["a"]
    assert any(lp for lp in alone["a"])
    assert all(lp is None for lp in together["b"])
