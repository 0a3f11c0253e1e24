"""Checks that need CUDA (run on a lent GPU; skipped elsewhere).

- bf16 decoding agrees with float32 on the bundled tiny models (same tokens on >= 95 % of
  held-out prompts);
- batch invariance holds on CUDA in float32 (a request's tokens do not depend on its batch);
- an engine step synchronises with the device once per forward (the read-back of its decisions),
  whatever the batch size;
- the CUDA-graph path (``--cuda-graphs``) gives exactly the eager path's tokens, in float32 and
  bf16, with every cached preset;
- the KV budget measured at start-up (profiling forward, --gpu-memory-utilization) leaves the
  device within the utilization;
- `bench engine` on CUDA: synchronised step timing, peak GPU memory, measured peak rates, and a
  fraction of the binding limit that stays physically possible.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from dllm_serve.bench.tasks import heldout_examples
from dllm_serve.cli import main
from dllm_serve.config import BUNDLED_MODELS_DIR, EngineConfig
from dllm_serve.engine.algorithms import presets_for
from dllm_serve.engine.cuda_graphs import BlockStepGraphs
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.loader import load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TINY_MODELS = [p for p in (BUNDLED_MODELS_DIR / n for n in ("tiny-llada", "tiny-nemotron")) if p.is_dir()]
GEN = 64
KV = "1GiB"  # an explicit KV budget: several engines live at once here, each would take 90 % of the GPU


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 must mean float32: no TF32 in matmuls while these tests run."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _requests(engine: Engine, algorithm: str, n: int, **opts) -> list[GenerationRequest]:
    """Held-out chat prompts with the engine's own resolution (checkpoint defaults included)."""
    tok = engine.loaded.tokenizer
    params = engine.resolve_params(GEN, {"seed": 0, **opts}, algorithm)
    return [
        GenerationRequest(f"r{i}", tok.render_chat([{"role": "user", "content": ex.prompt}]), params, GEN)
        for i, ex in enumerate(heldout_examples(n))
    ]


def _tokens(engine: Engine, requests) -> list[list[int]]:
    results = engine.run_to_completion(requests)
    assert not any(r.error for r in results.values())
    return [results[r.request_id].token_ids for r in requests]


@pytest.mark.parametrize("path", TINY_MODELS, ids=lambda p: p.name)
def test_bf16_agrees_with_float32(path):
    fp32 = Engine(
        load_model(path, dtype="float32", device="cuda"), EngineConfig(kv_cache_memory=KV, max_batch_size=32)
    )
    bf16 = Engine(
        load_model(path, dtype="bfloat16", device="cuda"), EngineConfig(kv_cache_memory=KV, max_batch_size=32)
    )
    algorithm = fp32.default_algorithm
    n = 100
    want = _tokens(fp32, _requests(fp32, algorithm, n))
    got = _tokens(bf16, _requests(bf16, algorithm, n))
    same = sum(a == b for a, b in zip(want, got, strict=True))
    assert same >= 0.95 * n, f"bf16 matched float32 on only {same}/{n} prompts"


@pytest.mark.parametrize("path", TINY_MODELS, ids=lambda p: p.name)
def test_batch_invariance_float32_on_cuda(path):
    """Each request alone, then all together (different prompt lengths, so padding differs)."""
    loaded = load_model(path, dtype="float32", device="cuda")
    single = Engine(loaded, EngineConfig(kv_cache_memory=KV, max_batch_size=1))
    batched = Engine(loaded, EngineConfig(kv_cache_memory=KV, max_batch_size=12))
    for preset in presets_for(loaded.family):
        requests = _requests(single, preset.name, 12)
        alone = [_tokens(single, [r])[0] for r in requests]
        together = _tokens(batched, requests)
        for i, (a, b) in enumerate(zip(alone, together, strict=True)):
            assert a == b, f"{preset.name}: request {i} changed when batched"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("path", TINY_MODELS, ids=lambda p: p.name)
def test_cuda_graphs_give_the_eager_tokens(path, dtype):
    """Two tokens per step (so every block has cached block steps), 12 requests (padded to 16).

    In float32 the graphs must give the plain eager engine's tokens. In bf16 a row's rounding may
    depend on the batch size the matmuls see (16 padded rows against 12), so there the reference
    is the same padded buffers run eagerly: the graph must replay exactly that computation.
    """
    loaded = load_model(path, dtype=dtype, device="cuda")
    eager = Engine(loaded, EngineConfig(kv_cache_memory=KV, max_batch_size=16))
    if dtype == "bfloat16":
        eager.runner.graphs = BlockStepGraphs(loaded.model, eager.runner.pool, max_batch=16, capture=False)
    graphed = Engine(loaded, EngineConfig(kv_cache_memory=KV, max_batch_size=16, cuda_graphs=True))
    opts = {"rule": "schedule", "steps": GEN // 2, "block_length": 16}
    for preset in presets_for(loaded.family):
        if preset.cache == "none":
            continue
        requests = _requests(eager, preset.name, 12, **opts)
        assert _tokens(graphed, requests) == _tokens(eager, requests), preset.name
    graphs = graphed.runner.graphs
    assert isinstance(graphs, BlockStepGraphs) and graphs.shapes
    assert graphs.captured == len(graphs.shapes)


@pytest.mark.parametrize(
    ("preset", "opts"),
    [("dual_cache", {"rule": "schedule", "steps": GEN // 2, "block_length": 16}), ("dinfer_credit", {})],
)
def test_one_device_sync_per_forward(preset, opts):
    """torch's sync debug mode warns at every host-device synchronisation: a whole run of 8
    requests (admission, refresh and block steps, streaming, retirement) makes exactly as many
    as it makes forwards."""
    loaded = load_model(TINY_MODELS[0], dtype="bfloat16", device="cuda")
    engine = Engine(loaded, EngineConfig(kv_cache_memory=KV, max_batch_size=8))
    calls = []
    engine.runner.forward_observers.append(calls.append)
    requests = _requests(engine, preset, 8, **opts)
    _tokens(engine, requests[:1])  # first-use work (the KV pool, cuBLAS handles) is not counted
    calls.clear()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _tokens(engine, requests)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == len(calls), [str(w.message) for w in syncs[:5]]


def test_bench_engine_on_cuda_tiny(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    args = ["bench", "engine", "--device", "cuda", "--batch-size", "8", "--prompt-len", "32"]
    args += ["--gen-length", "64", "--block-length", "32", "--fixed-tokens-per-step", "4"]
    args += ["--algorithm", "dual_cache", "--no-progress", "--json", "-o", str(out)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    tot = report["results"]["totals"]
    assert tot["committed_tokens"] == 8 * 64 and tot["steps"] == 16
    assert tot["peak_gpu_allocated_bytes"] > 0
    assert report["hardware"]["device"] == torch.cuda.get_device_name()
    assert report["model"]["dtype"] == "bfloat16"
    # Synchronised timing: the timed steps account for nearly all of the wall time.
    assert 0.5 * tot["wall_s"] < sum(report["results"]["step_seconds"]) <= tot["wall_s"]


def test_bench_engine_with_cuda_graphs(capsys):
    """The same run with graphs: same work, every block step replayed, refresh steps eager."""
    args = ["bench", "engine", "--device", "cuda", "--batch-size", "8", "--prompt-len", "32"]
    args += ["--gen-length", "64", "--block-length", "32", "--fixed-tokens-per-step", "4"]
    args += ["--algorithm", "dual_cache", "--no-progress", "--json", "--cuda-graphs"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    tot = report["results"]["totals"]
    assert tot["committed_tokens"] == 8 * 64 and tot["steps"] == 16 and tot["model_calls"] == 16
    assert report["results"]["steps"]["block"]["steps"] == 14


def test_bench_engine_on_cuda_8b_width(tmp_path, capsys):
    """Two LLaDA-8B layers at full width in bf16: a memory-bound block step can approach, but not
    beat, the bandwidth the benchmark measured (which checks the byte accounting)."""
    args = ["bench", "engine", "--device", "cuda", "--model-path", "llada-8b-instruct"]
    args += ["--load-format", "dummy", "--config-override", "n_layers=2", "--batch-size", "4"]
    args += ["--prompt-len", "128", "--gen-length", "128", "--block-length", "32"]
    args += ["--fixed-tokens-per-step", "4", "--algorithm", "dual_cache", "--no-progress", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    hw = report["hardware"]
    assert hw["matmul_flops_per_s"] > 1e13 and hw["read_bytes_per_s"] > 1e11  # any datacenter GPU
    block = report["results"]["steps"]["block"]
    assert block["steps"] > 0 and block["binding_limit"] == "memory"
    assert 0.05 < block["fraction_of_limit"] < 1.25
    assert report["results"]["totals"]["peak_gpu_allocated_bytes"] > 2 * 1.4e9  # the bf16 weights


def test_kv_budget_is_measured_within_the_utilization():
    """Weights + the profiling forward's peak + the KV arena stay within 0.5 of the device."""
    torch.cuda.empty_cache()
    loaded = load_model(TINY_MODELS[0], dtype="bfloat16", device="cuda")
    engine = Engine(loaded, EngineConfig(gpu_memory_utilization=0.5, max_batch_size=8))
    plan, pool = engine.runner.kv_plan, engine.runner.pool
    total = torch.cuda.mem_get_info()[1]
    assert plan.source.startswith("--gpu-memory-utilization 0.5 of")
    assert pool.capacity > 1024 and pool.cache.is_cuda
    assert torch.cuda.max_memory_allocated() <= 0.5 * total
    del engine, pool
    torch.cuda.empty_cache()
