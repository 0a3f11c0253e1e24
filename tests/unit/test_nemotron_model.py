"""The native Nemotron diffusion model against an independent, deliberately slow reference written here.

The reference follows the published architecture (Qwen3 layers under ``encoder.``, per-head RMSNorm
on q and k before rotate-half RoPE, grouped-query attention, ``diffusion_head``) one head and one
token at a time in float64, with an explicit list of visible keys per query.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

from dllm_serve.engine.kv_cache import KVPool, write_index
from dllm_serve.models.loader import CheckpointLoadError, detect_family, load_model
from dllm_serve.models.nemotron import NemotronConfig
from tests.nemotron_helpers import (
    REPO,
    random_nemotron_config,
    random_nemotron_weights,
    write_nemotron_checkpoint,
)


def reference_logits(
    cfg: NemotronConfig,
    w: dict[str, torch.Tensor],
    ids: list[int],
    positions: list[int],
    visible: list[list[bool]] | None = None,
) -> torch.Tensor:
    """Logits of every position of one sequence; ``visible[i][j]``: query i sees key j."""

    def g(name: str) -> torch.Tensor:
        return w[name].double()

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps) * weight

    hd, n = cfg.head_dim, len(ids)
    vis = visible or [[True] * n for _ in range(n)]

    def rope(vec: torch.Tensor, pos: int) -> torch.Tensor:
        out = torch.empty_like(vec)
        half = hd // 2
        for i in range(half):
            angle = pos / (cfg.rope_theta ** (2 * i / hd))
            c, s = math.cos(angle), math.sin(angle)
            out[i] = vec[i] * c - vec[i + half] * s
            out[i + half] = vec[i + half] * c + vec[i] * s
        return out

    x = torch.stack([g("encoder.embed_tokens.weight")[t] for t in ids])
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for layer in range(cfg.num_hidden_layers):
        p = f"encoder.layers.{layer}."
        a = p + "self_attn."
        h = norm(x, g(p + "input_layernorm.weight"))
        q, k, v = h @ g(a + "q_proj.weight").T, h @ g(a + "k_proj.weight").T, h @ g(a + "v_proj.weight").T
        heads = []
        for head in range(cfg.num_attention_heads):
            kvh = head // group

            qn, kn = (g(a + "q_norm.weight"), g(a + "k_norm.weight")) if cfg.qk_norm else (None, None)

            def qk(vec: torch.Tensor, weight: torch.Tensor | None, pos: int) -> torch.Tensor:
                return rope(vec if weight is None else norm(vec, weight), pos)

            qs = [qk(q[i, head * hd : (head + 1) * hd], qn, positions[i]) for i in range(n)]
            ks = [qk(k[j, kvh * hd : (kvh + 1) * hd], kn, positions[j]) for j in range(n)]
            vs = [v[j, kvh * hd : (kvh + 1) * hd] for j in range(n)]
            rows = []
            for i in range(n):
                scores = torch.tensor(
                    [float(qs[i] @ ks[j]) / math.sqrt(hd) if vis[i][j] else -math.inf for j in range(n)],
                    dtype=torch.float64,
                )
                probs = torch.softmax(scores, 0)
                rows.append(sum(probs[j] * vs[j] for j in range(n)))
            heads.append(torch.stack(rows))
        x = x + torch.cat(heads, dim=-1) @ g(a + "o_proj.weight").T
        h = norm(x, g(p + "post_attention_layernorm.weight"))
        gate, up = h @ g(p + "mlp.gate_proj.weight").T, h @ g(p + "mlp.up_proj.weight").T
        x = x + (torch.nn.functional.silu(gate) * up) @ g(p + "mlp.down_proj.weight").T
    x = norm(x, g("encoder.norm.weight"))
    head = g("encoder.embed_tokens.weight") if cfg.tie_word_embeddings else g("diffusion_head.weight")
    return x @ head.T


CONFIGS = {
    "gqa": {},
    "mha": {"num_key_value_heads": 4},
    "tied": {"tie_word_embeddings": True, "num_hidden_layers": 1},
    "no_qk_norm": {"qk_norm": False, "num_hidden_layers": 1},
    "wide_head": {"head_dim": 24, "num_hidden_layers": 1},  # head_dim * heads != hidden_size
}


def block_causal(limits: list[int], n: int) -> torch.Tensor:
    return torch.arange(n)[None, :] < torch.tensor(limits)[:, None]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_slow_reference(tmp_path, name):
    cfg = random_nemotron_config(**CONFIGS[name])
    w = random_nemotron_weights(cfg, seed=len(name))
    assert ("diffusion_head.weight" in w) != cfg.tie_word_embeddings
    assert ("encoder.layers.0.self_attn.q_norm.weight" in w) == cfg.qk_norm
    model = load_model(write_nemotron_checkpoint(tmp_path / name, cfg, w)).model
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=gen)
    positions = torch.tensor([list(range(9)), list(range(3, 12))])
    # Row 0 fully bidirectional; row 1 block-causal (prompt of 3, blocks of 3) as the engine asks.
    mask = torch.stack([torch.ones(9, 9, dtype=torch.bool), block_causal([3, 3, 3, 6, 6, 6, 9, 9, 9], 9)])
    index = torch.tensor([[0, 4, 8], [8, 3, 5]])
    got = model(ids, positions, mask, None, index)
    for row in range(2):
        want = reference_logits(cfg, w, ids[row].tolist(), positions[row].tolist(), mask[row].tolist())
        assert (got[row].double() - want[index[row]]).abs().max() < 1e-4


def test_sharded_and_single_file_load_identically(tmp_path):
    cfg = random_nemotron_config()
    w = random_nemotron_weights(cfg, seed=7)
    single = load_model(write_nemotron_checkpoint(tmp_path / "single", cfg, w)).model
    sharded = load_model(write_nemotron_checkpoint(tmp_path / "sharded", cfg, w, shards=3)).model
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    pos = torch.arange(12)[None]
    assert torch.equal(single(ids, pos), sharded(ids, pos))
    exported = single.export_state_dict()
    assert set(exported) == set(w)
    for name, tensor in w.items():
        assert torch.equal(exported[name], tensor), name


def test_dtype_dummy_and_roles(tmp_path):
    cfg = random_nemotron_config()
    path = write_nemotron_checkpoint(tmp_path / "m", cfg, random_nemotron_weights(cfg))
    loaded = load_model(path, dtype="bfloat16")
    bf16 = loaded.model
    assert loaded.family == "nemotron"
    assert next(bf16.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    assert torch.isfinite(bf16(ids, torch.arange(6)[None]).float()).all()
    dummy = load_model(path, load_format="dummy").model
    assert torch.isfinite(dummy(ids, torch.arange(6)[None])).all()
    vocab = loaded.tokenizer.hf.get_vocab()
    roles = bf16.roles
    assert roles.mask_token_id == vocab["<|mask|>"] == cfg.mask_token_id
    assert roles.eos_token_id == vocab["<|endoftext|>"]
    assert roles.eot_token_id == vocab["<|im_end|>"]
    assert set(loaded.tokenizer.stop_ids(roles.eos_token_id)) == {vocab["<|endoftext|>"], vocab["<|im_end|>"]}
    assert loaded.decode_defaults == {"block_length": cfg.block_size, "shift_logits": False}


def test_family_comes_from_config_not_path(tmp_path):
    cfg = random_nemotron_config()
    misleading = write_nemotron_checkpoint(tmp_path / "llada-8b-instruct", cfg, random_nemotron_weights(cfg))
    assert load_model(misleading).family == "nemotron"
    raw = json.loads((misleading / "config.json").read_text())
    assert raw["model_type"] == "nvrdiff" and raw["architectures"] == ["DiffEncoderModel"]
    assert detect_family({"architectures": ["DiffEncoderModel"]}) == "nemotron"
    assert detect_family({"model_type": "llada"}) == "llada"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dlm_paradigm": "autoregressive"}, "trust-remote-code"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mask_token_id": None}, "mask_token_id"),
    ],
)
def test_unsupported_config_is_a_clear_error(tmp_path, change, message):
    cfg = random_nemotron_config()
    path = write_nemotron_checkpoint(tmp_path / "m", cfg, random_nemotron_weights(cfg))
    raw = json.loads((path / "config.json").read_text())
    raw.update(change)
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        load_model(path)


def test_rope_scaling_is_refused_not_ignored():
    raw = json.loads(json.dumps({"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}))
    raw.update(intermediate_size=8, vocab_size=16, mask_token_id=3, eos_token_id=0)
    assert NemotronConfig.from_dict(raw).head_dim == 4
    raw["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="rope_scaling"):
        NemotronConfig.from_dict(raw)
    ministral = {**raw, "rope_scaling": None, "architectures": ["MinistralDiffEncoderModel"]}
    with pytest.raises(ValueError, match="trust-remote-code"):
        NemotronConfig.from_dict(ministral)


def test_missing_and_extra_tensors_are_clear_errors(tmp_path):
    cfg = random_nemotron_config()
    w = random_nemotron_weights(cfg)
    w.pop("encoder.layers.1.self_attn.k_norm.weight")
    with pytest.raises(CheckpointLoadError, match=r"layers\.1\.self_attn\.k_norm"):
        load_model(write_nemotron_checkpoint(tmp_path / "a", cfg, w))
    w = random_nemotron_weights(cfg)
    w["encoder.layers.0.self_attn.q_proj.bias"] = torch.zeros(cfg.num_attention_heads * cfg.head_dim)
    with pytest.raises(CheckpointLoadError, match=r"q_proj\.bias"):
        load_model(write_nemotron_checkpoint(tmp_path / "b", cfg, w))


def test_committed_context_cache_equals_uncached_block_causal_pass(tmp_path):
    """Forward prompt + block 0, then committed block 0 + block 1 through the KV cache: block 1's
    logits equal one uncached block-causal pass over the whole canvas."""
    cfg = random_nemotron_config()
    model = load_model(write_nemotron_checkpoint(tmp_path / "m", cfg, random_nemotron_weights(cfg))).model
    prompt, bl = 5, 4
    n = prompt + 2 * bl
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(5))
    limits = [prompt] * prompt + [prompt + bl] * bl + [n] * bl
    full = model(ids, torch.arange(n)[None], block_causal(limits, n)[None])
    pool = KVPool(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 128, torch.float32, "cpu")
    ext = [pool.allocate(n)]
    first = prompt + bl
    pos = torch.arange(first)[None]
    kv = pool.view(ext, write_index(ext, pos, pool.sink), first)
    step1 = model(ids[:, :first], pos, block_causal(limits[:first], first)[None], kv)
    assert (step1[:, prompt:] - full[:, prompt:first]).abs().max() < 1e-5
    pos = torch.arange(prompt, n)[None]
    span = block_causal(limits[prompt:], n)[None]
    step2 = model(ids[:, prompt:], pos, span, pool.view(ext, write_index(ext, pos, pool.sink), n))
    assert (step2 - full[:, prompt:]).abs().max() < 1e-5


def test_training_layout_matches_what_the_engine_computes(tmp_path):
    """The trainer's two-copy block-diffusion rows give the noisy block exactly the logits the
    engine's committed-context forward gives it: the objective fits the decoding plan. A 48-token
    canvas with 32-token blocks ends in a short block, as at inference."""
    spec = importlib.util.spec_from_file_location("train_tiny", REPO / "scripts" / "train_tiny.py")
    trainer = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = trainer  # its dataclasses look their module up
    spec.loader.exec_module(trainer)
    cfg = random_nemotron_config(max_position_embeddings=512)
    path = write_nemotron_checkpoint(tmp_path / "m", cfg, random_nemotron_weights(cfg, scale=0.1))
    model = load_model(path).model
    gen = torch.Generator().manual_seed(0)
    prompts = [list(range(7, 27)), [12, 13, 14], list(range(15, 52))]  # 20, 3, 37 tokens: prompt blocks
    sizes = [8, 16, 32]
    for rt in (32, 48):  # response length (a training canvas)
        responses = [torch.randint(5, cfg.vocab_size, (rt,), generator=gen).tolist() for _ in prompts]
        batch = trainer.block_diffusion_batch(
            prompts, responses, sizes, cfg.mask_token_id, cfg.eos_token_id, gen
        )
        logits = model(batch["ids"], batch["positions"], batch["mask"], None, batch["noisy_index"])
        for row, (p, bs) in enumerate(zip(prompts, sizes, strict=True)):
            noisy = batch["ids"][row, len(p) + rt : len(p) + 2 * rt]
            for start in range(0, rt, bs):
                end = min(start + bs, rt)
                # Canvas: prompt, clean response blocks before this one, then the noisy block.
                canvas = torch.tensor(p + responses[row][:start] + noisy[start:end].tolist())
                n = canvas.shape[0]
                prompt_limits = [min(len(p), (i // bs + 1) * bs) for i in range(len(p))]
                limits = prompt_limits + [min(n, len(p) + (i // bs + 1) * bs) for i in range(n - len(p))]
                want = model(canvas[None], torch.arange(n)[None], block_causal(limits, n)[None])
                got = logits[row, start:end]
                assert (got - want[0, n - (end - start) :]).abs().max() < 1e-4, (rt, row, start)
