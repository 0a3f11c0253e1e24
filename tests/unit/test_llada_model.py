"""The native LLaDA model against an independent, deliberately slow reference written here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dllm_serve.engine.kv_cache import KVPool, write_index
from dllm_serve.models import llada as llada_module
from dllm_serve.models.llada import PREFIX, LLaDAConfig, llada_config_dict
from dllm_serve.models.loader import CheckpointLoadError, load_model
from tests.helpers import TINY_LLADA, random_llada_config, random_official_weights, write_llada_checkpoint


def reference_logits(
    cfg: LLaDAConfig,
    w: dict[str, torch.Tensor],
    ids: list[int],
    positions: list[int],
    key_valid: list[bool] | None = None,
) -> torch.Tensor:
    """LLaDA's forward for one sequence, one head and one token at a time, in float64."""

    def g(name: str) -> torch.Tensor:
        return w[PREFIX + name].double()

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps) * weight

    hd = cfg.d_model // cfg.n_heads
    n = len(ids)
    valid = key_valid or [True] * n

    def rope(vec: torch.Tensor, pos: int) -> torch.Tensor:
        out = torch.empty_like(vec)
        half = hd // 2
        for i in range(half):
            angle = pos / (cfg.rope_theta ** (2 * i / hd))
            c, s = math.cos(angle), math.sin(angle)
            out[i] = vec[i] * c - vec[i + half] * s
            out[i + half] = vec[i + half] * c + vec[i] * s
        return out

    x = torch.stack([g("wte.weight")[t] for t in ids])
    group = cfg.n_heads // cfg.n_kv_heads
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        h = norm(x, g(p + "attn_norm.weight"))
        q = h @ g(p + "q_proj.weight").T
        k = h @ g(p + "k_proj.weight").T
        v = h @ g(p + "v_proj.weight").T
        heads = []
        for head in range(cfg.n_heads):
            kv_head = head // group
            qs = [rope(q[i, head * hd : (head + 1) * hd], positions[i]) for i in range(n)]
            ks = [rope(k[j, kv_head * hd : (kv_head + 1) * hd], positions[j]) for j in range(n)]
            vs = [v[j, kv_head * hd : (kv_head + 1) * hd] for j in range(n)]
            rows = []
            for i in range(n):
                scores = torch.tensor(
                    [float(qs[i] @ ks[j]) / math.sqrt(hd) if valid[j] else -math.inf for j in range(n)],
                    dtype=torch.float64,
                )
                probs = torch.softmax(scores, 0)
                rows.append(sum(probs[j] * vs[j] for j in range(n)))
            heads.append(torch.stack(rows))
        x = x + torch.cat(heads, dim=-1) @ g(p + "attn_out.weight").T
        h = norm(x, g(p + "ff_norm.weight"))
        gate = h @ g(p + "ff_proj.weight").T
        up = h @ g(p + "up_proj.weight").T
        x = x + (torch.nn.functional.silu(gate) * up) @ g(p + "ff_out.weight").T
    x = norm(x, g("ln_f.weight"))
    head = g("wte.weight") if cfg.weight_tying else g("ff_out.weight")
    return x @ head.T


CONFIGS = {
    "mha": {},
    "gqa": {"n_kv_heads": 2},
    "tied": {"weight_tying": True, "n_layers": 1},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_slow_reference(tmp_path, name):
    cfg = random_llada_config(**CONFIGS[name])
    w = random_official_weights(cfg, seed=len(name))
    assert (PREFIX + "ff_out.weight" in w) != cfg.weight_tying
    model = load_model(write_llada_checkpoint(tmp_path / name, cfg, w)).model
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=gen)
    positions = torch.tensor([list(range(9)), list(range(3, 12))])
    got = model(ids, positions)
    for row in range(2):
        want = reference_logits(cfg, w, ids[row].tolist(), positions[row].tolist())
        assert (got[row].double() - want).abs().max() < 1e-4


def test_padding_mask_and_logits_index(tmp_path):
    """Masked keys are invisible, and logits_index returns exactly the asked positions."""
    cfg = random_llada_config()
    w = random_official_weights(cfg)
    model = load_model(write_llada_checkpoint(tmp_path / "m", cfg, w)).model
    ids = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(8)[None]
    key_valid = torch.tensor([[True] * 6 + [False] * 2])
    index = torch.tensor([[5, 0, 2]])
    got = model(ids, positions, key_valid, None, index)[0]
    want = reference_logits(cfg, w, ids[0].tolist(), list(range(8)), key_valid[0].tolist())[[5, 0, 2]]
    assert (got.double() - want).abs().max() < 1e-4


def test_sharded_and_single_file_load_identically(tmp_path):
    cfg = random_llada_config(n_kv_heads=2)
    w = random_official_weights(cfg, seed=7)
    single = load_model(write_llada_checkpoint(tmp_path / "single", cfg, w)).model
    sharded = load_model(write_llada_checkpoint(tmp_path / "sharded", cfg, w, shards=3)).model
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    pos = torch.arange(12)[None]
    assert torch.equal(single(ids, pos), sharded(ids, pos))
    exported = single.export_state_dict()
    assert set(exported) == set(w)
    for name, tensor in w.items():
        assert torch.equal(exported[name], tensor), name


def test_dtype_and_dummy_load(tmp_path):
    cfg = random_llada_config()
    path = write_llada_checkpoint(tmp_path / "m", cfg, random_official_weights(cfg))
    bf16 = load_model(path, dtype="bfloat16").model
    assert next(bf16.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    assert torch.isfinite(bf16(ids, torch.arange(6)[None]).float()).all()
    dummy = load_model(path, load_format="dummy").model
    assert torch.isfinite(dummy(ids, torch.arange(6)[None])).all()


def test_missing_tensor_is_a_clear_error(tmp_path):
    cfg = random_llada_config()
    w = random_official_weights(cfg)
    w.pop(PREFIX + "blocks.1.up_proj.weight")
    with pytest.raises(CheckpointLoadError, match=r"do not fit .*blocks\.1\.up_proj\.weight"):
        load_model(write_llada_checkpoint(tmp_path / "m", cfg, w))


def test_missing_model_names_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="hf download GSAI-ML/LLaDA-8B-Instruct"):
        load_model("GSAI-ML/LLaDA-8B-Instruct")


def test_hub_cache_snapshot_resolves(tmp_path, monkeypatch):
    cfg = random_llada_config()
    snap = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    write_llada_checkpoint(snap, cfg, random_official_weights(cfg))
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert load_model("org/tiny").path == snap


def test_cached_span_equals_full_forward(tmp_path):
    """A block step against K/V cached by a full forward equals the full forward when nothing changed."""
    cfg = random_llada_config(n_kv_heads=2)
    model = load_model(write_llada_checkpoint(tmp_path / "m", cfg, random_official_weights(cfg))).model
    n = 20
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(n)[None]
    full = model(ids, pos)
    pool = KVPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 128, torch.float32, "cpu")
    ext = [pool.allocate(n)]
    model(ids, pos, torch.ones(1, n, dtype=torch.bool), pool.view(ext, write_index(ext, pos, pool.sink), n))
    block = slice(8, 12)
    span_pos = pos[:, block]
    kv = pool.view(ext, write_index(ext, span_pos, pool.sink), n)
    step = model(ids[:, block], span_pos, torch.ones(1, 4, n, dtype=torch.bool), kv)
    assert (step - full[:, block]).abs().max() < 1e-5


REAL_CONFIG = Path(llada_module.__file__).parent / "configs" / "llada-8b-instruct" / "config.json"
# Keys whose value differs in a small float32 model trained by scripts/train_tiny.py (shapes and
# token ids aside): how and in which precision it was initialised and trained, and its dtype.
OWN_VALUES = {"init_device", "init_fn", "precision", "torch_dtype"}
SHAPES_AND_IDS = {
    "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size", "embedding_size",
    "rope_theta", "max_sequence_length", "mask_token_id", "eos_token_id", "pad_token_id",
}  # fmt: skip


def test_written_config_has_every_key_of_llada_8b_with_its_values():
    """config.json as train_tiny writes it (and the bundled tiny-llada's): every key of
    LLaDA-8B-Instruct's, the real value wherever it applies; auto_map is absent (no modeling code)."""
    real = json.loads(REAL_CONFIG.read_text())
    for written in (
        llada_config_dict(random_llada_config()),
        json.loads((TINY_LLADA / "config.json").read_text()),
    ):
        assert set(written) == set(real), set(written) ^ set(real)
        assert "auto_map" not in written
        same = set(real) - OWN_VALUES - SHAPES_AND_IDS
        assert {k: written[k] for k in same} == {k: real[k] for k in same}
    assert LLaDAConfig.from_dict(real).n_kv_heads == 32  # the real config loads


@pytest.mark.parametrize(
    "change",
    [
        {"alibi": True},
        {"include_qkv_bias": True},
        {"include_bias": True},
        {"block_group_size": 2},
        {"layer_norm_with_affine": False},
        {"layer_norm_type": "default"},
        {"rope": False},
        {"scale_logits": True},
        {"multi_query_attention": True, "n_kv_heads": 4},
    ],
)
def test_options_the_native_model_cannot_run_are_refused_by_name(tmp_path, change):
    cfg = random_llada_config()
    path = write_llada_checkpoint(tmp_path / "m", cfg, random_official_weights(cfg))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"not supported by the native model: .*{key}="):
        load_model(path)


def test_multi_query_attention_means_one_kv_head():
    real = json.loads(REAL_CONFIG.read_text())
    assert LLaDAConfig.from_dict({**real, "multi_query_attention": True, "n_kv_heads": None}).n_kv_heads == 1
