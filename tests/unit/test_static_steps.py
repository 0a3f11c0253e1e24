"""Static-shape block steps (engine/cuda_graphs.py) on the CPU.

A CUDA graph replays fixed buffers: the batch padded to a bucket, the cache read through a strided
view of adjacent KV extents or a gather. Those buffers run here eagerly (``capture=False``) and must give
the eager engine's tokens; tests/gpu checks the captured graph itself against eager on CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dllm_serve.bench.tasks import heldout_examples
from dllm_serve.config import EngineConfig
from dllm_serve.engine.cuda_graphs import KEY_BUCKET, BlockStepGraphs, batch_bucket, key_bucket
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.kv_cache import Extent, KVPool, extent_tokens, write_index
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.loader import load_model
from tests.helpers import TINY_LLADA
from tests.nemotron_helpers import TINY_NEMOTRON

GEN = 32


def test_buckets():
    assert [batch_bucket(n, 64) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 25, 33)] == [
        1, 2, 4, 4, 8, 8, 16, 16, 24, 32, 40,
    ]  # fmt: skip
    assert batch_bucket(5, 6) == 6  # never more rows than the pool has slots
    assert KEY_BUCKET == 64
    assert [key_bucket(n, 1000) for n in (1, 64, 65, 200)] == [64, 64, 128, 256]
    assert key_bucket(900, 950) == 950  # never past the cache


@pytest.fixture(scope="module", params=[TINY_LLADA, TINY_NEMOTRON], ids=lambda p: p.name)
def loaded(request):
    return load_model(request.param)


def _requests(engine: Engine, algorithm: str, n: int) -> list[GenerationRequest]:
    """``n`` held-out prompts of one length, so that their KV extents have one size."""
    tok = engine.loaded.tokenizer
    # Two tokens per step: the tiny models would otherwise commit a block in its refresh forward.
    opts = {"seed": 0, "block_length": 16, "rule": "schedule", "steps": GEN // 2}
    params = engine.resolve_params(GEN, opts, algorithm)
    prompts = [tok.render_chat([{"role": "user", "content": ex.prompt}]) for ex in heldout_examples(4 * n)]
    prompts = [p for p in prompts if len(p) == len(prompts[0])][:n]
    return [GenerationRequest(f"r{i}", p, params, GEN) for i, p in enumerate(prompts)]


def _tokens(engine: Engine, requests: list[GenerationRequest]) -> list[list[int]]:
    results = engine.run_to_completion(requests)
    assert not any(r.error for r in results.values())
    return [results[r.request_id].token_ids for r in requests]


@pytest.mark.parametrize("gathered", [False, True], ids=["adjacent-extents", "gathered-extents"])
def test_static_block_steps_give_the_eager_tokens(loaded, gathered):
    """Five requests (padded to a batch of 8) with every cached preset of the family; their KV
    extents have one size. With extents 0 and 2 of that size held elsewhere the requests get
    extents 1, 3, 4, 5, 6 (in that unit), which are gathered."""
    cached = {"llada": ["prefix_cache", "dual_cache", "dinfer_blockwise"], "nemotron": ["nemotron"]}
    for algorithm in cached[loaded.family]:
        eager = Engine(loaded, EngineConfig(max_batch_size=8))
        requests = _requests(eager, algorithm, 5)
        want = _tokens(eager, requests)

        static = Engine(loaded, EngineConfig(max_batch_size=8))
        runner = static.runner
        graphs = runner.graphs = BlockStepGraphs(runner.model, runner.pool, max_batch=8, capture=False)
        size = extent_tokens(len(requests[0].prompt_ids) + GEN)
        if gathered:
            taken = [runner.pool.allocate(size) for _ in range(3)]
            runner.pool.release(taken[1])
        assert _tokens(static, requests) == want, algorithm
        # The whole batch's steps: padded to 8, read by gather or by a strided view from token 0.
        full = [s for s in graphs._steps if s.batch == 8]
        assert full and all(s.run == (None if gathered else (0, size)) for s in full), full


@pytest.mark.parametrize("gathered", [False, True], ids=["adjacent-extents", "gathered-extents"])
def test_static_step_matches_the_eager_forward_and_cache(gathered):
    """Hidden states and every cache entry (the sink aside) after two block steps of five rows
    padded to eight: padding rows must leave real cache entries alone."""
    model = load_model(TINY_LLADA).model
    gen = torch.Generator().manual_seed(0)
    vocab, canvas, max_len, n = model.vocab_size, 96, 128, 5
    extents = [Extent(i * max_len, max_len) for i in ([1, 3, 4, 5, 6] if gathered else [0, 1, 2, 3, 4])]
    pools = [KVPool(model.num_layers, model.num_kv_heads, model.head_dim, 8 * max_len, torch.float32, "cpu")]
    pools[0].cache.zero_()
    pools.append(copy.deepcopy(pools[0]))
    ids = torch.randint(0, vocab, (n, canvas), generator=gen)
    pos = torch.arange(canvas).expand(n, canvas)
    with torch.inference_mode():
        for pool in pools:  # the refresh forward fills both caches alike
            model.hidden_states(
                ids,
                pos,
                torch.ones(n, canvas, canvas, dtype=torch.bool),
                pool.view(extents, write_index(extents, pos, pool.sink), canvas),
            )
        static = BlockStepGraphs(model, pools[1], max_batch=8, capture=False)
        for start in (32, 48):
            q_ids = torch.randint(0, vocab, (n, 16), generator=gen)
            q_pos = torch.arange(start, start + 16).expand(n, 16)
            mask = (torch.arange(max_len) < canvas).expand(n, 16, max_len)
            index = torch.arange(16).expand(n, 16)
            write = write_index(extents, q_pos, pools[0].sink)
            want = model.hidden_states(q_ids, q_pos, mask, pools[0].view(extents, write, max_len), index)
            got = static.hidden_states(q_ids, q_pos, mask, write, extents, index)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    sink = pools[0].sink  # padding rows write only there
    torch.testing.assert_close(pools[0].cache[:, :, :sink], pools[1].cache[:, :, :sink], rtol=1e-5, atol=1e-5)
    assert [s.run for s in static._steps] == [None if gathered else (0, max_len)]
