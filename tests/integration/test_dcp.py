"""Serving torch.distributed.checkpoint (DCP) training checkpoints: real DCP files, real processes.

The "trained" weights are random (seeded) tiny-LLaDA-shaped tensors, different from the bundled
model's, and the bundled model is the base (config and tokenizer): so a conversion that quietly
kept the base weights, or mixed up names, gives different tokens and fails.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import openai
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from dllm_serve.checkpoints.dcp import (
    MARKER,
    DCPCheckpointError,
    cache_entry,
    convert_checkpoint,
    ensure_converted,
)
from dllm_serve.config import EngineConfig
from dllm_serve.engine.algorithms import resolve_params
from dllm_serve.engine.engine import build_engine
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.llada import LLaDAConfig
from dllm_serve.models.loader import load_model, load_safetensors
from tests.helpers import TINY_LLADA, random_llada_config, random_official_weights, write_llada_checkpoint
from tests.integration.conftest import free_port

SAVE_WORKER = Path(__file__).with_name("dcp_sharded_save.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TOKENIZER_MARKER = 12345  # model_max_length written into the checkpoint's own tokenizer


def _save_single(state: dict, directory: Path) -> None:
    """A DCP save from this one process (no process group)."""
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory)), no_dist=True)


def _cache_listing(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name != ".locks") if cache.exists() else []


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dcp")


@pytest.fixture(scope="module")
def trained(work: Path) -> Path:
    """The 'original' checkpoint: bundled config and tokenizer, random weights unlike the bundled ones."""
    cfg = LLaDAConfig.from_dict(json.loads((TINY_LLADA / "config.json").read_text()))
    return write_llada_checkpoint(work / "original", cfg, random_official_weights(cfg, seed=1))


@pytest.fixture(scope="module")
def trained_tensors(trained: Path) -> dict[str, torch.Tensor]:
    return load_file(str(trained / "model.safetensors"))


@pytest.fixture(scope="module")
def nemo_step(work: Path, trained: Path) -> Path:
    """NeMo-RL layout saved by 2 processes (gloo on CPU), each holding half of every tensor."""
    step = work / "nemo" / "step_4"
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(SAVE_WORKER), str(trained), str(step)],
            env={
                **ENV,
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode(errors="replace")[-3000:]
    # The checkpoint's own tokenizer differs from the base model's in one visible setting.
    tok_cfg = step / "policy" / "tokenizer" / "tokenizer_config.json"
    tok_cfg.write_text(json.dumps({**json.loads(tok_cfg.read_text()), "model_max_length": TOKENIZER_MARKER}))
    return step


def test_two_process_nemo_rl_checkpoint_converts_exactly(
    nemo_step: Path, trained_tensors: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    weights = nemo_step / "policy" / "weights"
    shards = sorted(p for p in weights.iterdir() if p.suffix == ".distcp")
    assert [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"]
    total = sum(t.nbytes for t in trained_tensors.values())
    for shard in shards:  # each rank really wrote about half of the weights
        assert 0.4 * total < shard.stat().st_size < 0.6 * total

    out = ensure_converted(str(nemo_step), str(TINY_LLADA), str(tmp_path / "cache"), show_progress=False)
    _assert_same_tensors(load_safetensors(out), trained_tensors)
    assert (out / "config.json").read_bytes() == (TINY_LLADA / "config.json").read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == TOKENIZER_MARKER
    provenance = json.loads((out / MARKER).read_text())
    assert provenance["layout"] == "nemo-rl" and provenance["key_prefix"] == "model."
    # The step, policy and weights directories name the same checkpoint, so the same cache entry.
    for alias in (nemo_step / "policy", weights):
        assert cache_entry(str(alias), str(TINY_LLADA), str(tmp_path / "cache")).path == out
    loaded = load_model(out)
    assert loaded.family == "llada" and loaded.tokenizer.hf.model_max_length == TOKENIZER_MARKER


def _requests(engine) -> list[GenerationRequest]:
    tok = engine.loaded.tokenizer
    out = []
    prompts = [tok.render_chat([{"role": "user", "content": "reverse: abc"}]), tok.encode("count 1 2 3")]
    for i, ids in enumerate(prompts):
        greedy = resolve_params("llada", "llada", 16, {"steps": 16})
        sampled = resolve_params("dual_cache", "llada", 16, {"temperature": 0.8, "seed": 7 + i})
        out += [GenerationRequest(f"g{i}", ids, greedy, 16), GenerationRequest(f"s{i}", ids, sampled, 16)]
    return out


def test_engine_from_dcp_path_gives_the_original_tokens(
    nemo_step: Path, trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dllm_serve.checkpoints.dcp")
    original = build_engine(EngineConfig(model_path=str(trained), device="cpu"))
    want = original.run_to_completion(_requests(original))
    assert sum(len(r.token_ids) for r in want.values()) > 0

    config = EngineConfig(
        dcp_path=str(nemo_step), base_model=str(TINY_LLADA), dcp_cache_dir=str(tmp_path / "c"), device="cpu"
    )
    for start, said in enumerate(("converting", "reusing cached conversion at")):
        caplog.clear()
        engine = build_engine(config)
        got = engine.run_to_completion(_requests(engine))
        assert {k: r.token_ids for k, r in got.items()} == {k: r.token_ids for k, r in want.items()}, start
        messages = [r.getMessage() for r in caplog.records]
        assert any(m.startswith(said) for m in messages), messages


def test_bare_dcp_directory_ignores_optimizer_and_other_state(
    work: Path, trained_tensors: dict[str, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = work / "bare"
    state = {
        **trained_tensors,  # official names, no wrapper
        "optim": {"state": {n: torch.zeros_like(t) for n, t in list(trained_tensors.items())[:3]}},
        "lr_scheduler": {"last_epoch": 3},
        "step": 12,
    }
    _save_single(state, bare)
    monkeypatch.setenv("DLLM_SERVE_CACHE", str(tmp_path / "env-cache"))  # the default cache directory
    entry = cache_entry(str(bare), str(TINY_LLADA))
    stale = entry.path.parent / f".tmp-{entry.path.name}-99999-deadbeef"  # left by a killed converter
    stale.mkdir(parents=True)
    out = ensure_converted(str(bare), str(TINY_LLADA), show_progress=False)
    assert out == entry.path and out.parent == tmp_path / "env-cache"
    assert _cache_listing(out.parent) == [out.name]
    _assert_same_tensors(load_safetensors(out), trained_tensors)
    provenance = json.loads((out / MARKER).read_text())
    assert provenance["key_prefix"] == "" and provenance["ignored_entries"] == 5
    # No tokenizer in the checkpoint: the base model's is used.
    assert (out / "tokenizer.json").read_bytes() == (TINY_LLADA / "tokenizer.json").read_bytes()


def test_model_subdir_layout_via_cli_with_sharded_output(
    work: Path, trained: Path, trained_tensors: dict[str, torch.Tensor]
) -> None:
    ckpt = work / "subdir"
    # torch.compile's wrapper leaks into names in some trainers; it is stripped.
    _save_single({"model": {f"_orig_mod.{n}": t for n, t in trained_tensors.items()}}, ckpt / "model")
    output = work / "converted-subdir"
    cmd = [sys.executable, "-m", "dllm_serve.cli", "convert-dcp", str(ckpt), "--base-model", str(TINY_LLADA)]
    cmd += ["--output", str(output), "--max-shard-size", "1MB", "--no-progress"]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(output)
    index = json.loads((output / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((output / s).stat().st_size <= 1_100_000 for s in shards)
    _assert_same_tensors(load_safetensors(output), trained_tensors)

    want = load_model(trained)
    got = load_model(output)
    ids = torch.tensor([[3, 17, 42, 5, 5, 5, 9]])
    pos = torch.arange(ids.shape[1])[None]
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(got.model(ids, pos, mask), want.model(ids, pos, mask))

    # An existing output is kept unless --force.
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_mismatched_checkpoints_fail_listing_the_first_mismatches(
    work: Path, trained_tensors: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    # Base model of other shapes (d_model 64, 2 layers) than the checkpoint (128, 4).
    other = random_llada_config()
    other_base = write_llada_checkpoint(tmp_path / "other-base", other, random_official_weights(other))
    nemo_like = work / "mismatch" / "weights"
    _save_single({"model": dict(trained_tensors)}, nemo_like)
    with pytest.raises(DCPCheckpointError) as err:
        convert_checkpoint(nemo_like, str(other_base), tmp_path / "out1", show_progress=False)
    text = str(err.value)
    first = "model.transformer.blocks.0.attn_norm.weight: checkpoint [128] vs base [64]"
    assert f"shape mismatches (21): {first}" in text
    assert "checkpoint tensors the base model lacks (18): model.model.transformer.blocks.2." in text
    assert not (tmp_path / "out1").exists()

    # A tensor short of the base model's set is named.
    dropped = "model.transformer.blocks.2.ff_out.weight"
    partial = work / "partial"
    _save_single({n: t for n, t in trained_tensors.items() if n != dropped}, partial)
    with pytest.raises(DCPCheckpointError, match=f"missing from the checkpoint \\(1\\): {dropped}"):
        ensure_converted(str(partial), str(TINY_LLADA), str(tmp_path / "c"), show_progress=False)

    # Names of some other model altogether.
    foreign = work / "foreign"
    _save_single({f"encoder.layers.{i}.weight": torch.zeros(4) for i in range(3)}, foreign)
    with pytest.raises(DCPCheckpointError, match="no tensor in the checkpoint matches"):
        ensure_converted(str(foreign), str(TINY_LLADA), str(tmp_path / "c"), show_progress=False)
    assert _cache_listing(tmp_path / "c") == []


def test_truncated_or_missing_checkpoints_fail_cleanly(nemo_step: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DCPCheckpointError, match="does not exist"):
        ensure_converted(str(tmp_path / "nope"), str(TINY_LLADA), str(cache))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DCPCheckpointError, match=r"no torch\.distributed\.checkpoint found"):
        ensure_converted(str(tmp_path / "empty"), str(TINY_LLADA), str(cache))

    broken = tmp_path / "step_4"
    shutil.copytree(nemo_step, broken)
    shard = broken / "policy" / "weights" / "__1_0.distcp"
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(DCPCheckpointError, match=r"__1_0\.distcp is truncated"):
        ensure_converted(str(broken), str(TINY_LLADA), str(cache), show_progress=False)
    shard.unlink()
    with pytest.raises(DCPCheckpointError, match=r"__1_0\.distcp is missing"):
        ensure_converted(str(broken), str(TINY_LLADA), str(cache), show_progress=False)
    metadata = broken / "policy" / "weights" / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:100])
    with pytest.raises(DCPCheckpointError, match=r"cannot read .*truncated"):
        ensure_converted(str(broken), str(TINY_LLADA), str(cache), show_progress=False)
    assert _cache_listing(cache) == []  # no half-written directory, no temporary left behind


def test_concurrent_conversions_convert_once(nemo_step: Path, tmp_path: Path) -> None:
    """Two real processes start while a third holds the lock; on release exactly one converts."""
    cache = tmp_path / "cache"
    entry = cache_entry(str(nemo_step), str(TINY_LLADA), str(cache))
    entry.lock.parent.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "dllm_serve.cli",
        "convert-dcp",
        str(nemo_step),
        "--base-model",
        str(TINY_LLADA),
    ]
    cmd += ["--dcp-cache-dir", str(cache), "--no-progress"]
    logs = [tmp_path / f"convert{i}.log" for i in range(2)]
    with entry.lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        procs = []
        for log in logs:
            with log.open("w") as f:
                procs.append(subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=f, text=True))
        deadline = time.monotonic() + 180
        while not all("waiting for another process" in log.read_text() for log in logs):
            assert time.monotonic() < deadline, [log.read_text() for log in logs]
            assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            time.sleep(0.2)
        assert _cache_listing(cache) == []  # both blocked: nothing written while the lock is held
        fcntl.flock(held, fcntl.LOCK_UN)
    outs = [p.communicate(timeout=180)[0].strip() for p in procs]
    texts = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], texts
    assert outs == [str(entry.path)] * 2
    assert sum("INFO dllm_serve.checkpoints.dcp: converting" in t for t in texts) == 1, texts
    assert sum("reusing cached conversion at" in t for t in texts) == 1, texts
    assert _cache_listing(cache) == [entry.path.name]
    load_model(entry.path)


def test_serve_from_dcp_path(server_factory, nemo_step: Path, trained: Path, tmp_path: Path) -> None:
    """`dllm-serve serve --dcp-path`: the same completions as the original checkpoint; restart reuses."""
    flags = ["--dcp-path", str(nemo_step), "--base-model", str(TINY_LLADA), "--dcp-cache-dir", str(tmp_path)]
    flags += ["--device", "cpu"]

    def complete(server) -> tuple[str, int]:
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        res = client.completions.create(model=model, prompt="count 1 2 3", max_tokens=16, temperature=0)
        return res.choices[0].text, res.usage.completion_tokens

    original = server_factory("--model-path", str(trained), "--device", "cpu", wait=False)
    first = server_factory(*flags, wait=False)  # both start at once to keep the test short
    original.wait_ready()
    want = complete(original)
    original.stop()
    assert want[1] > 0
    first.wait_ready()
    assert complete(first) == want
    first.stop()
    assert _converted(first.log())
    second = server_factory(*flags)
    assert complete(second) == want
    assert "reusing cached conversion at" in second.log()
    assert not _converted(second.log())


def _converted(log: str) -> bool:
    """The converter's own log line (the server's format adds a request-id field after the name)."""
    return bool(re.search(r"dllm_serve\.checkpoints\.dcp( \[[^]]*\])?: converting ", log))


def test_tied_head_repeated_by_training_is_dropped(tmp_path: Path) -> None:
    """A tied base model stores no output head; the training state dict's copy of it is not a mismatch."""
    cfg = random_llada_config(weight_tying=True)
    weights = random_official_weights(cfg, seed=3)
    base = write_llada_checkpoint(tmp_path / "tied-base", cfg, random_official_weights(cfg, seed=4))
    head = {"model.transformer.ff_out.weight": weights["model.transformer.wte.weight"]}
    _save_single({"model": {**weights, **head}}, tmp_path / "ckpt" / "model")
    out = convert_checkpoint(tmp_path / "ckpt", str(base), tmp_path / "out", show_progress=False)
    _assert_same_tensors(load_safetensors(out), weights)
    assert load_model(out).model.head is None


@pytest.mark.parametrize("family", ["nemotron", "dream"])
def test_other_families_names_are_mapped_the_same_way(tmp_path: Path, family: str) -> None:
    """The mapping is name-generic: a Nemotron-Diffusion or Dream checkpoint (whose own names start
    with `model.`) under NeMo-RL's `model.` wrapper."""
    base = TINY_LLADA.parent / f"tiny-{family}"
    gen = torch.Generator().manual_seed(5)
    bundled = load_file(str(base / "model.safetensors"))
    weights = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in bundled.items()}
    original = tmp_path / "original"
    shutil.copytree(base, original)
    save_file(weights, str(original / "model.safetensors"))
    state = {"model": weights, "optim": {"state": {"step": torch.tensor(3.0)}}}
    _save_single(state, tmp_path / "step_9" / "policy" / "weights")
    out = ensure_converted(str(tmp_path / "step_9"), str(base), str(tmp_path / "cache"), show_progress=False)
    assert json.loads((out / MARKER).read_text())["key_prefix"] == "model."
    _assert_same_tensors(load_safetensors(out), weights)
    got, want = load_model(out), load_model(original)
    assert got.family == family
    ids = torch.tensor([[3, 17, 42, 9]])
    pos = torch.arange(ids.shape[1])[None]
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(got.model(ids, pos, mask), want.model(ids, pos, mask))


# -- damaged checkpoints and cache entries: one-line errors, never served ----------------------


def _convert_cli(ckpt: Path, cache: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dllm_serve.cli", "convert-dcp", str(ckpt), "--base-model", str(TINY_LLADA)]
    cmd += ["--dcp-cache-dir", str(cache), "--no-progress"]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)


def _one_error_line(stderr: str) -> str:
    """The CLI's error: exactly one `error:` line and no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    return errors[0]


def test_zeroed_and_truncated_shards_fail_in_one_line_naming_the_file(
    nemo_step: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "step_4"
    shutil.copytree(nemo_step, broken)
    shard = broken / "policy" / "weights" / "__1_0.distcp"
    shard.write_bytes(bytes(shard.stat().st_size))  # zeroed at its original size
    cache = tmp_path / "cache"
    with pytest.raises(
        DCPCheckpointError, match=r"__1_0\.distcp is damaged: a stored tensor does not decode"
    ):
        ensure_converted(str(broken), str(TINY_LLADA), str(cache), show_progress=False)
    res = _convert_cli(broken, cache)
    assert res.returncode == 2 and res.stdout == ""
    assert "__1_0.distcp is damaged" in _one_error_line(res.stderr)

    with shard.open("r+b") as f:  # truncated: refused from the metadata before any read
        f.truncate(shard.stat().st_size - 1)
    res = _convert_cli(broken, cache)
    assert res.returncode == 2
    assert "__1_0.distcp is truncated" in _one_error_line(res.stderr)
    assert _cache_listing(cache) == []


def test_tensor_with_nan_or_inf_is_refused(trained_tensors: dict[str, torch.Tensor], tmp_path: Path) -> None:
    name = "model.transformer.blocks.1.ff_out.weight"
    for bad in (float("nan"), float("inf")):
        state = {n: t.clone() for n, t in trained_tensors.items()}
        state[name][3, 7] = bad
        ckpt = tmp_path / f"ckpt-{bad}"
        _save_single(state, ckpt)
        with pytest.raises(DCPCheckpointError, match=f"tensor {name} in .* holds 1 NaN/Inf value"):
            ensure_converted(str(ckpt), str(TINY_LLADA), str(tmp_path / "cache"), show_progress=False)
    assert _cache_listing(tmp_path / "cache") == []


def test_cache_entry_that_no_longer_matches_is_converted_again(
    work: Path, trained_tensors: dict[str, torch.Tensor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dllm_serve.checkpoints.dcp")
    ckpt = work / "for-cache"
    _save_single(dict(trained_tensors), ckpt)
    cache = str(tmp_path / "cache")
    out = ensure_converted(str(ckpt), str(TINY_LLADA), cache, show_progress=False)
    recorded = json.loads((out / MARKER).read_text())["files"]
    weights = out / "model.safetensors"
    assert set(recorded) == {f.name for f in out.iterdir() if f.name != MARKER}
    assert recorded["model.safetensors"]["bytes"] == weights.stat().st_size

    def tampered(change) -> list[str]:
        caplog.clear()
        change()
        again = ensure_converted(str(ckpt), str(TINY_LLADA), cache, show_progress=False)
        assert again == out
        _assert_same_tensors(load_safetensors(out), trained_tensors)
        return [r.getMessage() for r in caplog.records]

    def flip_one_byte() -> None:  # same size, different content: only the SHA-256 sees it
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))

    said = tampered(flip_one_byte)
    assert any("no longer matches its record" in m and "SHA-256 differs" in m for m in said), said
    assert any(m.startswith("converting") for m in said), said
    said = tampered(lambda: (out / "config.json").write_text("{}"))
    assert any("config.json is 2 bytes" in m for m in said), said
    said = tampered(lambda: None)  # intact: reused, not converted
    assert any(m.startswith("reusing cached conversion at") for m in said), said
    assert not any(m.startswith("converting") for m in said), said
    assert _cache_listing(tmp_path / "cache") == [out.name]


def test_serve_with_a_zeroed_shard_exits_non_zero_promptly(
    server_factory, nemo_step: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "step_4"
    shutil.copytree(nemo_step, broken)
    shard = broken / "policy" / "weights" / "__0_0.distcp"
    shard.write_bytes(bytes(shard.stat().st_size))
    flags = [
        "--dcp-path",
        str(broken),
        "--base-model",
        str(TINY_LLADA),
        "--dcp-cache-dir",
        str(tmp_path / "c"),
    ]
    server = server_factory(*flags, "--device", "cpu", wait=False)
    code = server.proc.wait(timeout=120)
    log = server.log()
    assert code != 0, log
    assert "Traceback" not in log and not re.search(r"serving \S+ on http", log), log
    errors = [line for line in log.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "__0_0.distcp is damaged" in errors[0], log
