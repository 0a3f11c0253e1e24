"""The KV cache's memory: size classes, the arena allocator, the start-up budget, admission by
memory and the engine loop's failure handling, on the CPU with the bundled tiny model."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from dllm_serve.bench.engine_bench import SHIPPED_CONFIGS
from dllm_serve.cli import main
from dllm_serve.config import EngineConfig
from dllm_serve.engine import faults
from dllm_serve.engine.algorithms import resolve_params
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.kv_cache import Extent, KVCacheFullError, KVPool, extent_tokens, kv_bytes_per_token
from dllm_serve.engine.memory import (
    KVBudgetError,
    KVPlan,
    budget_from_measurements,
    parse_bytes,
    profile_forward,
)
from dllm_serve.engine.sequence import GenerationRequest, SequenceEvent

TINY_BYTES_PER_TOKEN = 2 * 4 * 4 * 32 * 4  # k+v, 4 layers, 4 KV heads of 32, float32


def test_size_classes():
    """Multiples of 64 up to 512, then four classes per octave (at most 25 % rounding)."""
    sizes = [1, 64, 65, 300, 512, 513, 640, 641, 1024, 4097, 5120, 40960]
    assert [extent_tokens(n) for n in sizes] == [
        64,
        64,
        128,
        320,
        512,
        640,
        640,
        768,
        1024,
        5120,
        5120,
        40960,
    ]
    for n in range(1, 20000, 37):
        assert n <= extent_tokens(n) < 1.25 * n + 64 and extent_tokens(n) % 64 == 0


def test_bytes_per_token_at_the_real_models():
    assert kv_bytes_per_token(32, 32, 128, torch.bfloat16) == 512 * 1024  # LLaDA-8B: 0.5 MiB
    assert kv_bytes_per_token(36, 8, 128, torch.bfloat16) == 144 * 1024  # Nemotron-4B (GQA 32/8)


def test_arena_first_fit_release_and_merge():
    pool = KVPool(1, 1, 4, 1024, torch.float32, "cpu")
    a, b, c = pool.allocate(64), pool.allocate(100), pool.allocate(64)
    assert (a, b, c) == (Extent(0, 64), Extent(64, 128), Extent(192, 64))
    assert pool.used == 256 and pool.largest_free == 768
    pool.release(b)
    assert pool.allocate(60) == Extent(64, 64)  # first fit: the hole, not the tail
    with pytest.raises(KVCacheFullError):
        pool.allocate(900)
    assert not pool.fits(900) and pool.fits(700)
    for e in (a, c, Extent(64, 64)):
        pool.release(e)
    assert pool.used == 0 and pool.largest_free == 1024  # neighbours merged back into one run
    assert pool.peak_used == 256


def test_allocate_zeroes_the_extent():
    """Masked keys are still read; a previous owner's non-finite values must not leak into them."""
    pool = KVPool(2, 2, 4, 256, torch.float32, "cpu")
    pool.cache.fill_(float("nan"))
    e = pool.allocate(64)
    assert torch.all(pool.cache[:, :, e.start : e.start + e.tokens] == 0)
    assert torch.isnan(pool.cache[:, :, 64:]).all()


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5G") == 1_500_000_000
    assert parse_bytes("1000") == 1000
    assert parse_bytes("64kib") == 65536
    for bad in ("lots", "2 parsecs", ""):
        with pytest.raises(ValueError, match="memory size"):
            parse_bytes(bad)


def test_cuda_budget_arithmetic():
    """80 GB device at 0.9: 72 GB, less the 17 GB torch peak and the 0.5 GB held outside torch."""
    gb = 10**9
    budget = budget_from_measurements(
        total=80 * gb, free=62 * gb, reserved=17.5 * gb, peak=17 * gb, utilization=0.9
    )
    assert budget == 72 * gb - 17 * gb - 0.5 * gb


def test_budget_that_cannot_hold_one_longest_sequence_is_one_line_with_numbers():
    plan = KVPlan(100 * 2**20, "--kv-cache-memory 100MiB", 512 * 1024)
    assert plan.capacity == 192  # 200 tokens, rounded down to the extent alignment
    with pytest.raises(KVBudgetError) as err:
        plan.check_fits(4096)
    message = str(err.value)
    assert "\n" not in message
    for number in ("4096", "524288", "2.00 GiB", "100.00 MiB", "192 tokens", "--max-model-len"):
        assert number in message, (number, message)


def test_models_command_reports_kv_bytes_per_token_and_tokens_that_fit(capsys):
    """LLaDA-8B in bf16: 0.5 MiB per token; 50 GiB hold 102,400 tokens, 25 sequences of 4,096."""
    config = SHIPPED_CONFIGS / "llada-8b-instruct"
    assert main(["models", "--model-path", str(config), "--kv-cache-memory", "50GiB"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv_cache"]
    assert kv == {
        "dtype": "bfloat16",
        "bytes_per_token": 524288,
        "budget_bytes": 50 * 2**30,
        "prompt_cache_bytes": 0,  # full attention: no prompt cache
        "tokens_that_fit": 102400,
        "max_model_len": 4096,
        "longest_sequences_that_fit": 25,
    }


def test_models_command_carves_the_prompt_cache_for_block_causal_models(capsys):
    """Nemotron-4B in bf16: 144 KiB per token; of 50 GiB a tenth is the prompt cache, and the rest,
    45 GiB, holds 327,680 tokens: 8 sequences of its 40,960-token context."""
    config = SHIPPED_CONFIGS / "nemotron-diffusion-research-4b"
    assert main(["models", "--model-path", str(config), "--kv-cache-memory", "50GiB"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv_cache"]
    assert kv["bytes_per_token"] == 147456 and kv["prompt_cache_bytes"] == 5 * 2**30
    assert kv["tokens_that_fit"] == 327680 and kv["longest_sequences_that_fit"] == 8


def test_the_cache_is_allocated_at_start_up_from_the_budget(tiny):
    engine = Engine(tiny, EngineConfig(kv_cache_memory="1MiB", max_model_len=256))
    pool = engine.runner.pool
    assert pool.bytes_per_token == TINY_BYTES_PER_TOKEN
    assert pool.capacity == 2**20 // TINY_BYTES_PER_TOKEN == 256
    assert pool.cache.shape[2] == 257  # allocated now, before any request (the last token: the sink)
    with pytest.raises(KVBudgetError, match="1024 tokens"):  # the model's own 1024-token maximum
        Engine(tiny, EngineConfig(kv_cache_memory="1MiB"))


def test_max_model_len_limits_one_request_not_the_reservation(tiny):
    small = Engine(tiny, EngineConfig(kv_cache_memory="1MiB", max_model_len=128, max_batch_size=64))
    assert small.runner.pool.capacity == 256  # the budget decides, not 64 x 128
    with pytest.raises(KVBudgetError):
        Engine(tiny, EngineConfig(kv_cache_memory="256KiB", max_model_len=128))


def test_profiling_forward_runs(tiny):
    profile_forward(tiny.model, batch=2, length=40, width=16, device=torch.device("cpu"))


def _requests(loaded, n: int, gen: int = 16, prefix: str = "r") -> list[GenerationRequest]:
    params = resolve_params("dual_cache", "llada", gen, {"seed": 0, "block_length": 8})
    texts = ["Copy the list: " + " ".join("abcdefghij"[: 2 + i % 6]) for i in range(n)]
    return [
        GenerationRequest(
            f"{prefix}{i}", loaded.tokenizer.render_chat([{"role": "user", "content": t}]), params, gen
        )
        for i, t in enumerate(texts)
    ]


def test_requests_wait_for_memory_and_match_their_solo_runs(tiny):
    """A 256-token arena holds four 64-token extents: twelve requests run at most four at a time,
    within the budget, and each returns what it returns alone."""
    requests = _requests(tiny, 12)
    assert all(extent_tokens(len(r.prompt_ids) + 16) == 64 for r in requests)
    solo = {r.request_id: Engine(tiny, EngineConfig()).run_to_completion([r])[r.request_id] for r in requests}
    engine = Engine(tiny, EngineConfig(kv_cache_memory="1MiB", max_model_len=256, max_batch_size=64))
    running: list[int] = []
    engine.step_observers.append(lambda info: running.append(info.batch_size))
    together = engine.run_to_completion(requests)
    assert {k: v.token_ids for k, v in together.items()} == {k: v.token_ids for k, v in solo.items()}
    assert max(running) == 4 and engine.runner.pool.peak_used == 256 and engine.runner.pool.used == 0


def test_admission_is_first_in_first_out(tiny):
    """A request that needs the whole arena waits at the head; smaller ones behind it do not
    overtake it even when they would fit, so it cannot starve."""
    engine = Engine(tiny, EngineConfig(kv_cache_memory="1MiB", max_model_len=256, max_batch_size=64))
    small = _requests(tiny, 3)
    big_params = resolve_params("dual_cache", "llada", 200, {"seed": 0, "block_length": 8})
    big = GenerationRequest("big", small[0].prompt_ids, big_params, 200)
    assert extent_tokens(len(big.prompt_ids) + big_params.gen_length) == 256
    order: list[str] = []
    for r in [small[0], big, *small[1:]]:
        engine.scheduler.submit(r, lambda e: order.append(e.request_id) if e.finished else None)
    engine.step()
    assert engine.stats().running == 1 and engine.stats().waiting == 3  # the big one blocks the rest
    while engine.step():
        pass
    assert order == ["r0", "big", "r1", "r2"]


def test_loop_failures_back_off_and_mark_the_engine_failed(tiny, monkeypatch, caplog):
    """A failure outside any one request fails the running requests; after five in a row (backing
    off 0.1 s, doubling) the engine stops with a reason instead of spinning."""
    monkeypatch.setenv(faults.ENV, "engine-step")
    engine = Engine(tiny, EngineConfig())
    monkeypatch.delenv(faults.ENV)
    events: list[SequenceEvent] = []
    lock = threading.Lock()

    def sink(event: SequenceEvent) -> None:
        with lock:
            events.append(event)

    engine.start()
    start = time.monotonic()
    try:
        for r in _requests(tiny, 5):
            engine.add_request(r, sink)
            while not any(e.request_id == r.request_id for e in events):
                threading.Event().wait(0.01)
        engine._thread.join(timeout=10)
        assert not engine.is_running
        assert time.monotonic() - start >= 0.1 + 0.2 + 0.4 + 0.8  # the back-offs between failures
        assert engine.failure and "5 times in a row" in engine.failure and "InjectedFault" in engine.failure
        assert [e.finish_reason for e in events] == ["error"] * 5
        assert all(e.error == "internal error in the engine loop" for e in events)
        assert caplog.text.count("Traceback") <= 1
    finally:
        engine.shutdown(drain_timeout=0)


def test_unknown_fault_points_are_refused(monkeypatch):
    monkeypatch.setenv(faults.ENV, "engine-step,typo")
    with pytest.raises(ValueError, match="typo"):
        faults.enabled()


@pytest.mark.parametrize(
    "name, per_token",
    [
        ("nemotron-labs-diffusion-3b", 106496),  # 26 layers x 8 KV heads x 128 x (K, V) x 2 bytes
        ("nemotron-labs-diffusion-8b", 139264),  # 34 layers
        ("nemotron-labs-diffusion-14b", 163840),  # 40 layers
    ],
)
def test_models_command_on_the_nemotron_labs_configs(capsys, name, per_token):
    assert main(["models", "--model-path", str(SHIPPED_CONFIGS / name), "--kv-cache-memory", "50GiB"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "nemotron-labs"
    assert report["kv_cache"]["bytes_per_token"] == per_token
    names = [a["name"] for a in report["algorithms"]]
    assert names == ["nemotron_labs", "nemotron_labs_ar", "nemotron_labs_spec"]
