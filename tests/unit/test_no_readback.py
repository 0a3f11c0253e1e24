"""The device side of a step never reads a value back to the host.

Meta tensors have shapes and no values, so any operation that needs a value on the host (``bool()``
of a tensor, ``.item()``, ``.tolist()``, ``nonzero``, boolean-mask indexing) raises on them. On a GPU
each of those is a synchronisation, and inside a CUDA graph capture an error. The layer stack (both
ways of reading the KV pool) and every decoding function run here on meta tensors; the one
read-back a step makes is the runner's, after decoding (tests/gpu counts it on CUDA).
"""

from __future__ import annotations

import pytest
import torch

from dllm_serve.decoding import rules
from dllm_serve.decoding.confidence import confidence
from dllm_serve.decoding.registry import RULES
from dllm_serve.decoding.sampling import gumbel_argmax, top_p_filter
from dllm_serve.decoding.step import NoiseSpan, RowStep, decide, select_commits
from dllm_serve.engine.kv_cache import KVPool, PoolView
from dllm_serve.models.loader import load_model
from tests.helpers import TINY_LLADA
from tests.nemotron_helpers import TINY_NEMOTRON

META = torch.device("meta")
B, Q, KEYS, WIDTH = 3, 16, 128, 16


def test_meta_tensors_refuse_read_backs():
    """What makes the tests below able to fail."""
    t = torch.zeros(B, device=META)
    for read in (lambda: bool(t.any()), lambda: t.tolist(), lambda: t.nonzero(), lambda: t[t > 0]):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


@pytest.mark.parametrize("path", [TINY_LLADA, TINY_NEMOTRON], ids=lambda p: p.name)
def test_layer_stack_and_head_have_no_read_back(path):
    model = load_model(path).model.to(META)
    pool = KVPool(model.num_layers, model.num_kv_heads, model.head_dim, B * KEYS, torch.float32, META)
    ids, positions, write = (torch.zeros(B, Q, dtype=torch.long, device=META) for _ in range(3))
    mask = torch.zeros(B, Q, KEYS, dtype=torch.bool, device=META)
    index = torch.zeros(B, WIDTH, dtype=torch.long, device=META)
    gather = torch.zeros(B, KEYS, dtype=torch.long, device=META)
    with torch.inference_mode():
        for read in ((0, KEYS), gather):  # adjacent extents (a strided view) and gathered keys
            kv = PoolView(pool, write, KEYS, read)
            hidden = model.hidden_states(ids, positions, mask, kv, index)
            assert model.logits(hidden).shape == (B, WIDTH, model.vocab_size)


def test_decoding_has_no_read_back():
    vocab = 50
    logits = torch.zeros(B, WIDTH, vocab, device=META)
    knob = torch.zeros(B, device=META)
    candidates = torch.zeros(B, WIDTH, dtype=torch.bool, device=META)
    floor = torch.zeros(B, dtype=torch.long, device=META)
    logits = top_p_filter(logits, [0.9, 1.0, 0.5])
    probs = logits.softmax(-1)
    tokens = gumbel_argmax(logits[0], 0.7, torch.zeros(WIDTH, vocab, dtype=torch.float64, device=META))
    assert tokens.shape == (WIDTH,)
    conf = confidence(probs, logits.argmax(-1), [0, 1, 2])  # every measure at once
    credit = rules.credit_update(torch.zeros(B, WIDTH, vocab, device=META), probs, candidates, knob, knob)
    assert rules.credit_logits(logits, credit, knob).shape == logits.shape
    names = list(RULES)
    params = {"threshold": knob, "factor": knob, "low_threshold": knob}
    for rule_rows in ([0, 1, 2], [3, 4, 0]):  # every rule, several in one batch
        rows = [names[i] for i in rule_rows]
        assert select_commits(conf, candidates, floor, rows, params).shape == (B, WIDTH)


def test_the_whole_decoding_step_has_no_read_back():
    """decide() for a batch with every rule (credit's state included) and every measure that does
    not draw, on the meta device: any host read of a device value would raise."""
    from dllm_serve.engine.algorithms import resolve_params

    vocab = 50
    names = ["threshold", "credit", "hierarchy"]
    measures = ["low_confidence", "margin", "entropy"]
    overrides = [{"rule": n, "remasking": m, "top_p": 0.5} for n, m in zip(names, measures, strict=True)]
    rows = [
        RowStep(
            params=resolve_params("dinfer_blockwise", "llada", WIDTH, o),
            width=WIDTH,
            floor=1,
            noise=NoiseSpan(torch.Generator(), WIDTH),
            state=None,
        )
        for o in overrides
    ]
    block = torch.zeros(B, WIDTH, dtype=torch.long, device=META)
    logits = torch.zeros(B, WIDTH, vocab, device=META)
    step = decide(logits, block=block, rows=rows, mask_id=0, eos_id=1, eot_id=2)
    assert step.commit.shape == (B, WIDTH) and step.tokens.shape == (B, WIDTH)
    assert step.states[1] is not None and step.states[1].shape == (WIDTH, vocab)
    assert step.states[0] is None
