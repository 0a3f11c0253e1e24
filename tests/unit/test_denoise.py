"""The engine's denoise trace: every committed token in exactly one step, final state = the completion.

Every preset of both bundled families runs with and without the trace; the trace must not change
the tokens, and folding its steps must rebuild the canvas the completion was read from.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dllm_serve.config import EngineConfig
from dllm_serve.engine.algorithms import presets_for, resolve_params
from dllm_serve.engine.denoise import DenoiseStep, DenoiseTrace, read_back
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.sequence import GenerationRequest, SequenceEvent
from dllm_serve.models.loader import load_model
from dllm_serve.server.denoise_stream import DenoiseView
from tests.helpers import TINY_LLADA
from tests.nemotron_helpers import TINY_NEMOTRON
from tests.sdar_helpers import TINY_SDAR

CASES = (
    [(TINY_LLADA, p.name) for p in presets_for("llada")]
    + [(TINY_NEMOTRON, p.name) for p in presets_for("nemotron")]
    + [(TINY_SDAR, p.name) for p in presets_for("sdar")]  # the first block starts inside the prompt
)


@pytest.fixture(scope="module")
def models():
    return {path: load_model(path) for path in (TINY_LLADA, TINY_NEMOTRON, TINY_SDAR)}


def _events(loaded, request: GenerationRequest) -> list[SequenceEvent]:
    engine = Engine(loaded, EngineConfig())
    events: list[SequenceEvent] = []
    engine.scheduler.submit(request, events.append, ignore_queue_limit=True)
    while engine.step():
        pass
    return events


def _request(loaded, preset: str, denoise: bool, **overrides) -> GenerationRequest:
    family = loaded.family
    params = resolve_params(preset, family, 40, {"seed": 3, "block_length": 8, **overrides})
    prompt = loaded.tokenizer.render_chat([{"role": "user", "content": "Copy the list: a b c d e f"}])
    return GenerationRequest("r", prompt, params, 40, denoise=denoise)


@pytest.mark.parametrize(("path", "preset"), CASES, ids=lambda v: getattr(v, "name", v))
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_trace_folds_to_the_completion(models, path, preset, temperature):
    loaded = models[path]
    plain = _events(loaded, _request(loaded, preset, False, temperature=temperature))
    traced = _events(loaded, _request(loaded, preset, True, temperature=temperature))
    assert all(e.denoise is None for e in plain)
    tokens = [t for e in plain for t in e.token_ids]
    assert [t for e in traced for t in e.token_ids] == tokens  # the trace changes nothing
    assert traced[-1].finish_reason == plain[-1].finish_reason

    steps = [e.denoise for e in traced if e.denoise is not None]
    assert len(steps) >= 2 and [s.step for s in steps] == list(range(1, len(steps) + 1))
    canvas: dict[int, int] = {}
    for s in steps:
        assert 0 <= s.block_start < s.canvas_length
        for pos, tok, _conf in s.committed:
            assert pos not in canvas, f"position {pos} committed twice"
            assert s.block_start <= pos < s.block_start + s.block_length
            canvas[pos] = tok
        for pos, _tok, conf in s.guesses:
            assert pos not in canvas and s.block_start <= pos < s.block_start + s.block_length
            assert conf == conf  # not NaN
    # The committed prefix of the folded canvas is the completion (then its stop token, if any).
    assert [canvas[i] for i in range(len(tokens))] == tokens
    if traced[-1].stopped_on_token:
        assert canvas[len(tokens)] in loaded.tokenizer.stop_ids(loaded.model.roles.eos_token_id)
    assert steps[-1].step == traced[-1].forwards  # one step per forward


def test_refresh_steps_are_marked(models):
    loaded = models[TINY_LLADA]
    steps = [e.denoise for e in _events(loaded, _request(loaded, "dual_cache", True)) if e.denoise]
    refreshes = [s for s in steps if s.refresh]
    assert refreshes and len(refreshes) < len(steps)
    assert all(s.block_start % 8 == 0 for s in steps)


def test_guesses_are_changes_only(models):
    """A masked position is resent only when its guess or rounded confidence changed."""
    loaded = models[TINY_LLADA]
    steps = [e.denoise for e in _events(loaded, _request(loaded, "llada", True, steps=40)) if e.denoise]
    last: dict[int, tuple[int, float]] = {}
    for s in steps:
        for pos, tok, conf in s.guesses:
            assert last.get(pos) != (tok, conf)
            last[pos] = (tok, conf)
    sent = sum(len(s.guesses) for s in steps)
    masked_per_step = sum(s.block_length for s in steps)  # an upper bound on the full state
    assert sent < masked_per_step


def test_rows_that_do_not_trace_read_nothing_back():
    """Meta tensors refuse any read-back (tests/unit/test_no_readback.py): none happens here."""
    meta = torch.zeros(3, 8, device="meta")
    plain = [SimpleNamespace(trace=None)] * 3
    assert read_back(plain, meta.long(), meta) == {}
    with pytest.raises((RuntimeError, NotImplementedError)):
        read_back([*plain[:2], SimpleNamespace(trace=DenoiseTrace())], meta.long(), meta)


@pytest.mark.parametrize("path", [TINY_LLADA, TINY_NEMOTRON], ids=lambda p: p.name)
def test_the_sse_field_names_tokens_and_specials(models, path):
    tok = models[path].tokenizer
    view = DenoiseView(tok)
    word = tok.encode("a")[0]
    eos = models[path].model.roles.eos_token_id
    step = DenoiseStep(4, 1, 8, 8, 32, False, [(9, eos, 0.97)], [(10, word, 0.5)])
    field = view.field(step)
    assert field == {
        "step": 4,
        "block": 1,
        "block_start": 8,
        "block_length": 8,
        "canvas_length": 32,
        "refresh": False,
        "committed": [[9, eos, tok.hf.decode([eos], skip_special_tokens=False), 0.97]],
        "masked": [[10, word, "a", 0.5]],
    }
    assert field["committed"][0][2].startswith("<|")  # end of text is shown by name, not as ""
