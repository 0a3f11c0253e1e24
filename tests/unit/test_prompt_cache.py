"""Prompt-cache reuse (engine/prompt_cache.py): keys, LRU order, budget, and exactness in the engine.

Exactness is checked against the same engine with the cache off (``prompt_cache_memory="0"``):
same tokens for every request, whether it missed, hit a whole or a partial prefix, ran next to
others that stored or evicted the blocks it needed, or followed a cancelled request.
"""

from __future__ import annotations

import threading

import pytest
import torch

from dllm_serve.config import EngineConfig
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.kv_cache import KVPool
from dllm_serve.engine.memory import DEFAULT_PROMPT_CACHE_SHARE, KVBudgetError, plan_kv_cache
from dllm_serve.engine.prompt_cache import PromptCache, block_keys
from dllm_serve.engine.sequence import GenerationRequest, SequenceEvent
from dllm_serve.models.loader import load_model
from tests.nemotron_helpers import (
    TINY_NEMOTRON,
    random_nemotron_config,
    random_nemotron_weights,
    write_nemotron_checkpoint,
)
from tests.sdar_helpers import random_sdar_config, random_sdar_weights, write_sdar_checkpoint

BL = 8  # block length of the engine tests: prompts span many blocks


@pytest.fixture(scope="module")
def nemotron():
    return load_model(TINY_NEMOTRON)


@pytest.fixture(scope="module")
def random_nemotron(tmp_path_factory):
    """Random weights: unsaturated probabilities, so a wrong K/V shows in the tokens."""
    cfg = random_nemotron_config()
    path = tmp_path_factory.mktemp("nemotron") / "m"
    return load_model(write_nemotron_checkpoint(path, cfg, random_nemotron_weights(cfg, scale=0.3)))


# -- keys, LRU, budget --------------------------------------------------------------------------


def test_a_block_key_depends_on_every_earlier_token_and_the_block_length():
    a = block_keys(list(range(20)), 8)
    assert len(a) == 2  # the partial block [16, 20) has no key
    b = block_keys([99, *list(range(1, 20))], 8)
    assert a[0][0] != b[0][0] and a[1][0] != b[1][0]  # a change in block 0 changes block 1's key
    c = block_keys([*list(range(16)), 7, 7, 7, 7], 8)
    assert [k for k, _, _ in c] == [k for k, _, _ in a]  # the tail is not part of any key
    assert block_keys(list(range(20)), 4)[0][0] != a[0][0]
    assert a[1][1] == a[0][0]  # parent chain


def _pool(tokens: int = 256) -> KVPool:
    return KVPool(2, 1, 4, tokens, torch.float32, "cpu")


def _write(pool: KVPool, extent, prompt: list[int]) -> None:
    """K/V that identify the prompt's tokens, as a forward would write them."""
    for i, t in enumerate(prompt):
        pool.cache[:, :, extent.start + i] = float(t)


def test_reuse_copies_the_longest_cached_chain_and_stops_at_the_first_difference():
    pool = _pool()
    cache = PromptCache(10 * 4 * pool.bytes_per_token, pool.bytes_per_token)
    first = list(range(1, 13))  # blocks of 4: three full blocks
    ext = pool.allocate(len(first))
    _write(pool, ext, first)
    assert cache.reuse(first, 4, pool, ext) == 0
    cache.store(first, 4, pool, ext)
    other = [*first[:8], 50, 51, 52, 53, 54]  # shares two blocks, then differs
    ext2 = pool.allocate(len(other))
    assert cache.reuse(other, 4, pool, ext2) == 8
    assert pool.cache[0, 0, ext2.start : ext2.start + 8, 0, 0].tolist() == [float(t) for t in first[:8]]
    assert pool.cache[0, 0, ext2.start + 8, 0, 0] == 0  # the rest is the fresh, zeroed extent
    assert cache.reuse(first, 8, pool, ext2) == 0  # another block length: other keys
    s = cache.stats()
    assert (s.lookups, s.hits, s.reused_tokens, s.blocks) == (3, 1, 8, 3)


def test_lru_keeps_the_budget_and_evicts_leaves_before_their_prefixes():
    pool = _pool()
    per_block = 4 * pool.bytes_per_token
    cache = PromptCache(4 * per_block, pool.bytes_per_token)  # four blocks
    shared = [1, 2, 3, 4]
    a = [*shared, 5, 6, 7, 8, 9, 10, 11, 12]
    b = [*shared, 20, 21, 22, 23]
    for prompt in (a, b):
        ext = pool.allocate(len(prompt))
        _write(pool, ext, prompt)
        cache.store(prompt, 4, pool, ext)
        pool.release(ext)
    # a's three blocks and b's second block fill the budget; nothing was evicted yet.
    assert cache.stats().blocks == 4 and cache.stats().used_bytes == 4 * per_block
    ext = pool.allocate(12)
    assert cache.reuse(b, 4, pool, ext) == 8
    c = [*shared, 30, 31, 32, 33]
    _write(pool, ext, c)
    cache.store(c, 4, pool, ext)  # evicts the least recent block: a's leaf, not the shared root
    assert cache.stats().evicted_blocks == 1 and cache.stats().used_bytes == 4 * per_block
    assert cache.reuse(a, 4, pool, ext) == 8
    assert pool.cache[0, 0, ext.start : ext.start + 8, 0, 0].tolist() == [float(t) for t in a[:8]]
    assert cache.reuse(b, 4, pool, ext) == 8 and cache.reuse(c, 4, pool, ext) == 8


def test_a_budget_below_one_block_turns_reuse_off():
    pool = _pool()
    cache = PromptCache(4 * pool.bytes_per_token - 1, pool.bytes_per_token)
    ext = pool.allocate(8)
    cache.store(list(range(8)), 4, pool, ext)
    assert cache.reuse(list(range(8)), 4, pool, ext) == 0
    assert cache.stats().lookups == 0 and cache.stats().blocks == 0


# -- the budget is carved out of the KV budget -----------------------------------------------------


def test_block_causal_models_carve_the_prompt_cache_out_of_the_kv_budget(nemotron, tiny):
    dev, dt = torch.device("cpu"), torch.float32
    cfg = EngineConfig(kv_cache_memory="64MiB")
    plan = plan_kv_cache(nemotron.model, cfg, dev, dt, 1024, block_causal=True)
    assert plan.prompt_cache_bytes == int(64 * 2**20 * DEFAULT_PROMPT_CACHE_SHARE)
    assert plan.capacity == (64 * 2**20 - plan.prompt_cache_bytes) // plan.bytes_per_token // 64 * 64
    explicit = EngineConfig(kv_cache_memory="64MiB", prompt_cache_memory="1MiB")
    assert plan_kv_cache(nemotron.model, explicit, dev, dt, 1024, True).prompt_cache_bytes == 2**20
    assert plan_kv_cache(tiny.model, cfg, dev, dt, 1024, block_causal=False).prompt_cache_bytes == 0
    with pytest.raises(KVBudgetError, match="--prompt-cache-memory"):
        too_much = EngineConfig(kv_cache_memory="4MiB", prompt_cache_memory="3MiB")
        plan_kv_cache(nemotron.model, too_much, dev, dt, 1024, True)


def test_full_attention_models_never_use_the_prompt_cache(tiny):
    engine = Engine(tiny, EngineConfig(prompt_cache_memory="64MiB"))
    assert engine.runner.prompt_cache.budget_bytes == 0
    params = engine.resolve_params(32, algorithm="dual_cache")
    prompt = list(range(10, 90))
    engine.run_to_completion([GenerationRequest(f"r{i}", prompt, params, 32) for i in range(2)])
    assert engine.stats().prompt_cache.lookups == 0


# -- exactness in the engine -------------------------------------------------------------------


def _prompts(loaded, n: int, shared: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts that share their first ``shared`` tokens, each with its own ending of odd
    length (a partial last block)."""
    g = torch.Generator().manual_seed(seed)
    vocab = loaded.model.roles.mask_token_id + 10  # ordinary tokens above the special ids
    prefix = torch.randint(vocab, 300, (shared,), generator=g).tolist()
    return [prefix + torch.randint(vocab, 300, (5 + 3 * i,), generator=g).tolist() for i in range(n)]


def _requests(engine, prompts, tag: str, **overrides) -> list[GenerationRequest]:
    params = engine.resolve_params(16, {"block_length": BL, "seed": 0, **overrides})
    return [GenerationRequest(f"{tag}{i}", p, params, 16) for i, p in enumerate(prompts)]


def _tokens(engine, requests) -> dict[str, list[int]]:
    out = engine.run_to_completion(requests)
    return {rid: r.token_ids for rid, r in out.items()}


@pytest.fixture(scope="module")
def random_sdar(tmp_path_factory):
    """SDAR's aligned blocks: the first generation block starts inside the prompt's last block."""
    cfg = random_sdar_config()
    path = tmp_path_factory.mktemp("sdar") / "m"
    return load_model(write_sdar_checkpoint(path, cfg, random_sdar_weights(cfg, scale=0.3)))


@pytest.mark.parametrize("model", ["nemotron", "random_nemotron", "random_sdar"])
def test_reused_prompt_blocks_give_the_same_tokens_as_recomputing_them(model, request):
    loaded = request.getfixturevalue(model)
    prompts = _prompts(loaded, 6, shared=8 * BL + 3)
    off = Engine(loaded, EngineConfig(prompt_cache_memory="0"))
    on = Engine(loaded, EngineConfig())
    want = _tokens(off, _requests(off, prompts, "r"))
    assert off.stats().prompt_cache.lookups == 0
    # One request first (it stores the prefix), then the rest together (they reuse it), then all
    # again (whole prompts' full blocks cached), with sampling too.
    got = _tokens(on, _requests(on, prompts[:1], "r"))
    got.update(_tokens(on, _requests(on, prompts, "r")[1:]))
    assert got == want
    s = on.stats().prompt_cache
    assert s.lookups == 6 and s.hits == 5 and s.reused_tokens == 5 * 8 * BL
    assert _tokens(on, _requests(on, prompts, "r")) == want
    hot = _tokens(on, _requests(on, prompts, "t", temperature=0.7))
    assert hot == _tokens(off, _requests(off, prompts, "t", temperature=0.7))
    assert on.runner.pool.used == 0


def test_requests_admitted_together_store_once_and_evict_safely(random_nemotron):
    """Prompts of three different prefixes under a budget of six blocks, all submitted at once:
    stores, hits and evictions interleave inside the running batch, and every output is exact."""
    loaded = random_nemotron
    prompts = [p for seed in range(3) for p in _prompts(loaded, 3, shared=4 * BL, seed=seed)]
    off = Engine(loaded, EngineConfig(prompt_cache_memory="0", max_batch_size=4))
    want = _tokens(off, _requests(off, prompts, "r"))
    block_bytes = BL * off.runner.pool.bytes_per_token
    on = Engine(loaded, EngineConfig(prompt_cache_memory=str(6 * block_bytes), max_batch_size=4))
    for _ in range(2):
        assert _tokens(on, _requests(on, prompts, "r")) == want
    s = on.stats().prompt_cache
    assert s.hits > 0 and s.evicted_blocks > 0 and s.used_bytes <= 6 * block_bytes


def test_a_cancelled_request_leaves_the_cache_consistent(random_nemotron):
    loaded = random_nemotron
    prompts = _prompts(loaded, 3, shared=6 * BL)
    off = Engine(loaded, EngineConfig(prompt_cache_memory="0"))
    want = _tokens(off, _requests(off, prompts, "r"))
    on = Engine(loaded, EngineConfig())
    on.start()
    try:
        events: list[SequenceEvent] = []
        done = threading.Event()

        def sink(event: SequenceEvent) -> None:
            events.append(event)
            if event.finished:
                done.set()

        first = _requests(on, prompts[:1], "c", early_stop=False, threshold=1.0)[0]
        on.add_request(first, sink)
        while on.stats().prompt_cache.blocks == 0 and not done.is_set():
            done.wait(0.005)  # its first forward stored the prefix
        on.abort(first.request_id)
        assert done.wait(10)
    finally:
        on.shutdown(drain_timeout=1)
    assert on.runner.pool.used == 0
    got = _tokens(on, _requests(on, prompts, "r"))
    assert got == want
    assert on.stats().prompt_cache.hits >= 3
