"""`dllm-serve bench engine` on the CPU: exact step accounting, FLOP/byte model, peak rates, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dllm_serve.bench import engine_bench
from dllm_serve.bench.engine_bench import run_engine_bench
from dllm_serve.bench.engine_measure import BenchError, BenchSettings, fixed_step_overrides
from dllm_serve.bench.hardware import (
    PeakRates,
    forward_cost,
    measure_matmul_rate,
    measure_read_bandwidth,
    shape_from_config,
)
from dllm_serve.cli import main
from dllm_serve.config import EngineConfig
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.kv_cache import KVPool, write_index
from dllm_serve.models.dream import DreamConfig, DreamModel
from dllm_serve.models.llada import LLaDAConfig, LLaDAModel
from dllm_serve.models.loader import load_model
from tests.helpers import TINY_LLADA, random_llada_config

# Rates given, not measured: the step accounting must not depend on the machine.
RATES = PeakRates("test", "float32", 1e10, 1e10, 0, 0, source="given")
SMALL_8B_WIDTH = ["n_layers=1", "d_model=256", "n_heads=2", "n_kv_heads=2", "mlp_hidden_size=512"]


def _bench(loaded, algorithm: str, batch: int = 3, k: int = 4, gen: int = 32, block: int = 16) -> dict:
    engine = Engine(loaded, EngineConfig(max_batch_size=batch, max_model_len=128))
    settings = BenchSettings(
        batch_size=batch,
        prompt_len=10,
        gen_length=gen,
        block_length=block,
        fixed_tokens_per_step=k,
        algorithm=algorithm,
        progress=False,
    )
    report = run_engine_bench(engine, settings, RATES)
    assert not engine.scheduler.has_work()
    assert engine.runner.pool.used == 0  # warm-up and timed requests released their KV extents
    return report


@pytest.mark.parametrize(
    ("algorithm", "refresh_steps"),
    [("llada", 0), ("dual_cache", 2), ("dinfer_blockwise", 8)],
)
def test_fixed_tokens_per_step_commits_exactly_k(tiny, algorithm, refresh_steps):
    """K=4, 32 tokens, blocks of 16: 8 steps of 3 rows x 4 tokens; refreshes per the cache policy
    (dual: one per block; dInfer: its 4 warm-up steps cover all 4 steps of a block)."""
    report = _bench(tiny, algorithm)
    tot, steps = report["totals"], report["steps"]
    assert tot["steps"] == 8
    assert tot["committed_tokens"] == 3 * 32
    assert tot["forwards"] == 3 * 8
    assert tot["tokens_per_forward"] == 4.0
    assert set(report["step_kinds"]) <= {"block", "refresh"}
    assert steps["refresh"]["steps"] == refresh_steps
    assert steps["block"]["steps"] == 8 - refresh_steps
    assert steps["all"]["tokens_per_step"] == 12.0
    assert set(tot["finish_reasons"]) <= {"stop", "length"}  # the canvas runs to the end either way
    assert len(report["step_seconds"]) == 8 and min(report["step_seconds"]) > 0
    # A refresh forwards the whole canvas, a block step of dual cache only the block.
    if refresh_steps and steps["block"]["steps"]:
        assert steps["refresh"]["flops"] / refresh_steps > steps["block"]["flops"] / steps["block"]["steps"]


def test_dummy_weights_take_the_same_steps(tiny):
    """The point of --fixed-tokens-per-step: the step count and work do not depend on the weights."""
    real = _bench(tiny, "dual_cache", batch=2, k=8)
    dummy = _bench(load_model(TINY_LLADA, load_format="dummy"), "dual_cache", batch=2, k=8)
    for key in ("steps", "committed_tokens", "forwards", "refresh_forwards", "model_calls"):
        assert real["totals"][key] == dummy["totals"][key]
    assert real["steps"]["all"]["flops"] == dummy["steps"]["all"]["flops"]


def test_fixed_step_overrides_validate():
    assert fixed_step_overrides(64, 32, 8) == {
        "rule": "schedule",
        "steps": 8,
        "block_length": 32,
        "early_stop": False,
    }
    with pytest.raises(BenchError, match="divide the block length"):
        fixed_step_overrides(64, 32, 5)
    with pytest.raises(BenchError, match="multiple of the block length"):
        fixed_step_overrides(40, 32, 8)


def _counted_flops(model, *args) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*args)
    return counter.get_total_flops()


def test_forward_flops_match_torch_flop_counter():
    """The analytic FLOPs equal what torch counts, op by op, for a GQA model with and without a cache."""
    cfg = random_llada_config(n_kv_heads=2, n_layers=2)
    model = LLaDAModel(cfg).eval()
    shape = shape_from_config({**cfg.__dict__, "model_type": "llada"})
    b, q = 2, 12
    ids = torch.randint(0, cfg.vocab_size, (b, q))
    pos = torch.arange(q).expand(b, q)
    mask = torch.ones(b, q, q, dtype=torch.bool)
    index = torch.arange(4, 12).expand(b, 8)
    with torch.inference_mode():
        counted = _counted_flops(model, ids, pos, mask, None, index)
    assert forward_cost(shape, b, q, q, 8, 4).flops == counted

    # A block step: 5 queries attend to 20 cached keys, logits for the 5 positions.
    pool = KVPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 256, torch.float32, "cpu")
    extents = [pool.allocate(32) for _ in range(b)]
    qpos = torch.arange(15, 20).expand(b, 5)
    view = pool.view(extents, write_index(extents, qpos, pool.sink), 20)
    mask = torch.ones(b, 5, 20, dtype=torch.bool)
    with torch.inference_mode():
        counted = _counted_flops(model, ids[:, :5], qpos, mask, view, torch.arange(5).expand(b, 5))
    cost = forward_cost(shape, b, 5, 20, 5, 4)
    assert cost.flops == counted
    assert cost.kv_bytes == 2 * cfg.n_layers * b * cfg.n_kv_heads * 20 * cfg.head_dim * 4


def test_shipped_llada_config_has_the_real_shape():
    """The streamed-weight count from config.json equals the real LLaDA-8B model's matrices."""
    path = engine_bench.SHIPPED_CONFIGS / "llada-8b-instruct" / "config.json"
    raw = json.loads(path.read_text())
    shape = shape_from_config(raw)
    with torch.device("meta"):
        model = LLaDAModel(LLaDAConfig.from_dict(raw))
    matrices = sum(
        p.numel() for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("embed")
    )
    assert shape.streamed_params == matrices
    assert 7.4e9 < shape.streamed_params + shape.d_model * shape.vocab_size < 8.1e9  # "8B" with embeddings
    assert (raw["mask_token_id"], raw["eos_token_id"], raw["vocab_size"]) == (126336, 126081, 126464)


def test_nemotron_config_reads_hugging_face_keys():
    raw = json.loads(
        (engine_bench.SHIPPED_CONFIGS / "nemotron-diffusion-research-4b" / "config.json").read_text()
    )
    shape = shape_from_config(raw)
    assert (shape.n_heads, shape.n_kv_heads, shape.head_dim) == (32, 8, 128)
    assert shape.head_dim * shape.n_heads != shape.d_model  # head_dim comes from the config, not d / heads
    assert 3.5e9 < shape.streamed_params < 4.5e9


def test_shipped_dream_config_has_the_real_shape():
    """Dream-v0-Instruct-7B (Qwen2.5-7B's stack, q/k/v biases): the streamed weights are the model's
    matrices; with the embedding it is the published 7.6B."""
    raw = json.loads((engine_bench.SHIPPED_CONFIGS / "dream-v0-instruct-7b" / "config.json").read_text())
    shape = shape_from_config(raw)
    with torch.device("meta"):
        model = DreamModel(DreamConfig.from_dict(raw))
    matrices = sum(
        p.numel() for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("embed")
    )
    assert shape.streamed_params == matrices
    assert (shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.attention_bias) == (28, 4, 128, True)
    assert 7.4e9 < shape.streamed_params + shape.d_model * shape.vocab_size < 7.8e9
    assert (raw["mask_token_id"], raw["eos_token_id"], raw["vocab_size"]) == (151666, 151643, 152064)


def test_cli_on_the_shipped_dream_config_reduced(tmp_path):
    """bench engine on the Dream-7B shape with dummy weights (narrowed), its default preset."""
    narrow = [
        "num_hidden_layers=1",
        "hidden_size=256",
        "num_attention_heads=2",
        "num_key_value_heads=1",
        "intermediate_size=512",
    ]
    args = ["--model-path", "dream-v0-instruct-7b", "--load-format", "dummy", "--batch-size", "2"]
    args += [a for o in narrow for a in ("--config-override", o)]
    args += ["--prompt-len", "8", "--gen-length", "16", "--block-length", "8", "--fixed-tokens-per-step", "4"]
    proc = subprocess.run(
        [sys.executable, "-m", "dllm_serve.cli", "bench", "engine", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    model = report["model"]
    assert model["shape"]["vocab_size"] == 152064 and model["shape"]["attention_bias"] is True
    assert model["mask_token_id"] == 151666
    assert report["results"]["totals"]["committed_tokens"] == 2 * 16


def test_peak_rates_are_measured_on_the_cpu():
    flops, size = measure_matmul_rate(torch.device("cpu"), torch.float32, size=256, repeats=2)
    bandwidth, nbytes = measure_read_bandwidth(torch.device("cpu"), torch.float32, 32 << 20, repeats=2)
    assert size == 256 and nbytes == 32 << 20
    assert 1e8 < flops < 1e14
    assert 1e8 < bandwidth < 1e13


def test_cli_on_the_shipped_8b_config_reduced(tmp_path):
    """The real entry point, a shipped config with dummy weights narrowed by overrides, JSON out."""
    out = tmp_path / "r.json"
    args = ["--model-path", "llada-8b-instruct", "--load-format", "dummy", "--batch-size", "2"]
    args += [a for o in SMALL_8B_WIDTH for a in ("--config-override", o)]
    args += ["--prompt-len", "8", "--gen-length", "16", "--block-length", "8", "--fixed-tokens-per-step", "4"]
    proc = subprocess.run(
        [sys.executable, "-m", "dllm_serve.cli", "bench", "engine", *args, "--json", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report
    model, tot = report["model"], report["results"]["totals"]
    assert model["shape"]["vocab_size"] == 126464 and model["shape"]["d_model"] == 256
    assert model["mask_token_id"] == 126336
    assert model["config_overrides"]["n_layers"] == 1
    assert tot["committed_tokens"] == 2 * 16 and tot["steps"] == 4
    assert tot["peak_rss_bytes"] > 0
    hw = report["hardware"]
    assert hw["source"] == "measured" and hw["matmul_flops_per_s"] > 0 and hw["read_bytes_per_s"] > 0
    every = report["results"]["steps"]["all"]
    assert every["binding_limit"] in {"compute", "memory"}
    assert 0 < every["fraction_of_limit"] < 2


def test_table_output_on_tiny_llada(capsys):
    code = main(
        [
            "bench",
            "engine",
            "--batch-size",
            "2",
            "--prompt-len",
            "8",
            "--gen-length",
            "32",
            "--block-length",
            "16",
            "--fixed-tokens-per-step",
            "8",
            "--algorithm",
            "dual_cache",
            "--peak-flops",
            "1e10",
            "--peak-bandwidth",
            "1e10",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "| block | 2 |" in out and "| refresh | 2 |" in out
    assert "64 tokens in" in out and "8.00 tokens/forward" in out
    # 4096 B/token = k + v x 4 layers x 4 KV heads x 32 x float32. The default budget is the batch's:
    # 2 sequences of at most 8 + 32 + 16 tokens, 64-token extents, 2 x 64 x 4096 B = 512 KiB.
    kv = "KV cache 4096 B/token, 128 tokens fit (512.00 KiB: --kv-cache-memory 524288)"
    assert kv + "; the run held at most 128 tokens" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model-path", "llada-8b-instruct"], "pass --load-format dummy"),
        (["--config-override", "n_layers=1"], "pass --load-format dummy"),
        (["--block-length", "16", "--fixed-tokens-per-step", "5"], "must divide the block length"),
        (["--model-path", "no-such-model"], "not a model directory or a shipped config"),
        (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs a CUDA device"),
        (
            ["--kv-cache-memory", "256KiB", "--batch-size", "2", "--prompt-len", "8", "--gen-length", "32"],
            "the KV cache holds 64 tokens, the batch needs 128",
        ),
    ],
)
def test_cli_errors_are_clear(capsys, extra, message):
    fixed = ["--no-progress", "--peak-flops", "1", "--peak-bandwidth", "1"]
    assert main(["bench", "engine", *fixed, *extra]) == 2
    assert message in capsys.readouterr().err


def test_nemotron_config_runs_or_says_why(capsys):
    """Until the native Nemotron model lands, the shipped config fails with a clear message."""
    args = ["bench", "engine", "--model-path", "nemotron-diffusion-research-4b", "--load-format", "dummy"]
    args += ["--config-override", "num_hidden_layers=1", "--config-override", "hidden_size=256"]
    args += ["--config-override", "intermediate_size=512", "--config-override", "head_dim=32"]
    args += ["--batch-size", "1", "--prompt-len", "8", "--gen-length", "32", "--fixed-tokens-per-step", "8"]
    args += ["--peak-flops", "1e10", "--peak-bandwidth", "1e10", "--no-progress", "--json"]
    try:
        import dllm_serve.models.nemotron  # noqa: F401
    except ImportError:
        assert main(args) == 2
        assert "native Nemotron model" in capsys.readouterr().err
        return
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["family"] == "nemotron"
    assert report["results"]["totals"]["committed_tokens"] == 32


@pytest.mark.parametrize(
    ("name", "low", "high"), [("sdar-4b-chat", 3.7e9, 4.3e9), ("sdar-8b-chat", 7.2e9, 8.0e9)]
)
def test_sdar_configs_have_their_shapes_and_run(capsys, name, low, high):
    """SDAR-4B/8B shapes (Qwen3 base, untied head) with dummy weights, narrowed; block 4 decodes."""
    raw = json.loads((engine_bench.SHIPPED_CONFIGS / name / "config.json").read_text())
    shape = shape_from_config(raw)
    assert low < shape.streamed_params < high and (shape.n_kv_heads, shape.head_dim) == (8, 128)
    assert (raw["mask_token_id"], raw["block_size"]) == (151669, 4)
    args = ["bench", "engine", "--model-path", name, "--load-format", "dummy"]
    args += ["--config-override", "num_hidden_layers=1", "--config-override", "hidden_size=256"]
    args += ["--config-override", "intermediate_size=512", "--config-override", "head_dim=32"]
    args += ["--batch-size", "2", "--prompt-len", "9", "--gen-length", "16", "--block-length", "4"]
    args += ["--fixed-tokens-per-step", "2", "--peak-flops", "1e10", "--peak-bandwidth", "1e10"]
    assert main([*args, "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["family"] == "sdar"
    # A 9-token prompt: the first block (positions 8-11) holds 3 masks and the canvas ends on a
    # block boundary, so each row decodes 16 + 3 positions at 2 per step.
    assert report["results"]["totals"]["committed_tokens"] == 2 * 19


def test_shipped_sdar_30b_a3b_config_counts_active_experts_and_runs(capsys):
    """SDAR-30B-A3B (Qwen3-30B-A3B shape, 128 experts of 768, 8 per token, every layer sparse):
    30.5 B stored, about 3 B multiplied per token; narrowed, it decodes with SDAR's preset."""
    from dllm_serve.models.sdar_moe import SDARMoeConfig, SDARMoeModel

    raw = json.loads((engine_bench.SHIPPED_CONFIGS / "sdar-30b-a3b-chat" / "config.json").read_text())
    shape = shape_from_config(raw)
    with torch.device("meta"):
        model = SDARMoeModel(SDARMoeConfig.from_dict(raw))
    assert 30.4e9 < sum(p.numel() for p in model.parameters()) < 30.6e9
    assert (shape.experts, shape.active_experts, shape.shared_mlp_hidden) == (128, 8, 0)
    per_token = shape.n_layers * shape.layer_matmul_params + shape.head_params
    assert 2.9e9 < per_token < 3.2e9
    assert (shape.n_kv_heads, shape.head_dim, raw["mask_token_id"], raw["block_size"]) == (4, 128, 151669, 4)
    args = ["bench", "engine", "--model-path", "sdar-30b-a3b-chat", "--load-format", "dummy"]
    small = ["num_hidden_layers=2", "hidden_size=128", "intermediate_size=256", "head_dim=32"]
    small += ["num_experts=8", "num_experts_per_tok=2", "moe_intermediate_size=64", "mlp_only_layers=[0]"]
    args += [a for o in small for a in ("--config-override", o)]
    args += ["--batch-size", "2", "--prompt-len", "9", "--gen-length", "16", "--block-length", "4"]
    args += ["--fixed-tokens-per-step", "2", "--peak-flops", "1e10", "--peak-bandwidth", "1e10"]
    assert main([*args, "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["family"] == "sdar-moe"
    assert (report["model"]["shape"]["experts"], report["model"]["shape"]["active_experts"]) == (8, 2)
    assert report["results"]["totals"]["committed_tokens"] == 2 * 19


@pytest.mark.parametrize(
    ("name", "total", "active"),
    [("llada2.0-mini", (15.5e9, 17.5e9), (1.0e9, 1.6e9)), ("llada2.0-flash", (99e9, 107e9), (5.0e9, 6.5e9))],
)
def test_shipped_llada2_configs_count_active_experts_only(name, total, active):
    """LLaDA2.0-mini (16B-A1.4B) and -flash (100B-A6B): a token multiplies its 8 routed experts and the
    shared one; a forward reads the experts its tokens hit, all of them only for a large batch."""
    from dllm_serve.models.llada2 import LLaDA2Config, LLaDA2Model

    raw = json.loads((engine_bench.SHIPPED_CONFIGS / name / "config.json").read_text())
    shape = shape_from_config(raw)
    with torch.device("meta"):
        model = LLaDA2Model(LLaDA2Config.from_dict(raw))
    stored = sum(p.numel() for p in model.parameters())
    assert total[0] < stored < total[1]
    per_token = shape.n_layers * shape.layer_matmul_params + shape.head_params
    assert active[0] < per_token < active[1]
    assert shape.experts_hit(1) == pytest.approx(8) and shape.experts_hit(4096) == pytest.approx(256)
    one = forward_cost(shape, 1, 1, 1, 1, 2)
    assert one.weight_bytes == pytest.approx(2 * per_token)  # one token: only its experts are read
    many = forward_cost(shape, 64, 32, 32, 32, 2)
    assert many.weight_bytes == pytest.approx(2 * shape.streamed_params, rel=1e-3)
    assert (raw["vocab_size"], raw["pad_token_id"]) == (157184, 156892)


def test_cli_on_the_shipped_llada2_mini_config_reduced():
    """bench engine on LLaDA2.0-mini's config narrowed to a few experts (dummy weights, its default
    preset): it runs, and reports the MoE shape it timed."""
    args = ["bench", "engine", "--model-path", "llada2.0-mini", "--load-format", "dummy", "--batch-size", "2"]
    small = [
        "num_hidden_layers=2",
        "hidden_size=128",
        "intermediate_size=256",
        "num_attention_heads=4",
        "num_key_value_heads=2",
        "head_dim=32",
        "num_experts=16",
        "moe_intermediate_size=64",
    ]
    args += [a for o in small for a in ("--config-override", o)]
    args += ["--prompt-len", "8", "--gen-length", "32", "--fixed-tokens-per-step", "4", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "dllm_serve.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    shape = report["model"]["shape"]
    assert (shape["experts"], shape["active_experts"], shape["mlp_hidden"]) == (16, 8, 64)
    # LLaDA2 decodes to the end of the block holding the last token (as its generate() does):
    # 8 prompt + 32 tokens end in the second 32-token block, so 64 - 8 positions per row.
    assert report["results"]["totals"]["committed_tokens"] == 2 * 56


# Published totals with embeddings (bf16 bytes / 2 match the hub's 15.95 GiB and 25.33 GiB for 8B and
# 14B; docs/nemotron-labs.md) and (layers, hidden, MLP) of each shipped Nemotron-Labs config.
LABS_SHAPES = {
    "nemotron-labs-diffusion-3b": (3.8e9, (26, 3072, 9216)),
    "nemotron-labs-diffusion-8b": (8.5e9, (34, 4096, 14336)),
    "nemotron-labs-diffusion-14b": (13.5e9, (40, 5120, 16384)),
}


@pytest.mark.parametrize("name", sorted(LABS_SHAPES))
def test_nemotron_labs_configs_have_the_published_shapes_and_run(capsys, name):
    """Each shipped Nemotron-Labs config: the published shape, and `bench engine` with dummy weights
    (narrowed by overrides) runs its default preset, the causal-context diffusion."""
    raw = json.loads((engine_bench.SHIPPED_CONFIGS / name / "config.json").read_text())
    total, dims = LABS_SHAPES[name]
    shape = shape_from_config(raw)
    assert (shape.n_layers, shape.d_model, shape.mlp_hidden) == dims
    assert (shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.vocab_size) == (32, 8, 128, 131072)
    assert abs(shape.streamed_params + shape.d_model * shape.vocab_size - total) < 0.05 * total
    assert (raw["mask_token_id"], raw["block_size"]) == (100, 32)
    args = ["bench", "engine", "--model-path", name, "--load-format", "dummy"]
    args += ["--config-override", "num_hidden_layers=1", "--config-override", "hidden_size=256"]
    args += ["--config-override", "intermediate_size=512", "--config-override", "head_dim=32"]
    args += ["--batch-size", "2", "--prompt-len", "8", "--gen-length", "64", "--fixed-tokens-per-step", "8"]
    args += ["--peak-flops", "1e10", "--peak-bandwidth", "1e10", "--no-progress", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["family"] == "nemotron-labs"
    assert report["model"]["mask_token_id"] == 100
    assert report["results"]["totals"]["committed_tokens"] == 2 * 64
