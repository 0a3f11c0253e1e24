"""The native LLaDA2 MoE model against an independent, deliberately slow reference written here.

The reference follows the published ``modeling_llada2_moe.py`` step by step in float64, one token
and one head at a time: fused ``query_key_value`` split into 16/4-style GQA heads, per-head RMSNorm
of q and k, rotate-half RoPE on the first ``partial_rotary_factor`` of each head, block-causal
visibility, and the MoE gate exactly as published (sigmoid scores, expert bias for the choice only,
groups scored by their two best biased scores, top-k among the kept groups, unbiased weights
normalised then scaled by ``routed_scaling_factor``, one shared expert), experts run token by token.
"""

from __future__ import annotations

import math

import pytest
import torch

from dllm_serve.models import moe
from dllm_serve.models.llada2 import LLaDA2Config, LLaDA2Model
from dllm_serve.models.loader import detect_family, load_model
from dllm_serve.models.moe import MoEBlock, MoEConfig, route
from tests.llada2_helpers import random_llada2_config, random_llada2_weights, write_llada2_checkpoint


def reference_logits(
    cfg: LLaDA2Config, w: dict[str, torch.Tensor], ids: list[int], block: int
) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """Logits of every position under the block-causal mask, and each MoE layer's chosen experts."""

    def g(name: str) -> torch.Tensor:
        return w[name].double()

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    def silu(x: torch.Tensor) -> torch.Tensor:
        return x / (1 + torch.exp(-x))

    def mlp(x: torch.Tensor, p: str) -> torch.Tensor:
        gate = g(p + "gate_proj.weight") @ x
        up = g(p + "up_proj.weight") @ x
        return g(p + "down_proj.weight") @ (silu(gate) * up)

    hd, n, rdim = cfg.head_dim, len(ids), int(cfg.head_dim * cfg.partial_rotary_factor)

    def rope(vec: torch.Tensor, pos: int) -> torch.Tensor:
        out = vec.clone()
        half = rdim // 2
        for i in range(half):
            angle = pos / (cfg.rope_theta ** (2 * i / rdim))
            c, s = math.cos(angle), math.sin(angle)
            out[i] = vec[i] * c - vec[i + half] * s
            out[i + half] = vec[i + half] * c + vec[i] * s
        return out

    m = cfg.moe
    x = torch.stack([g("model.word_embeddings.weight")[t] for t in ids])
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    chosen: list[list[list[int]]] = []
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        a = p + "attention."
        h = norm(x, g(p + "input_layernorm.weight"))
        qs, ks, vs = [], [], []
        for t in range(n):
            qkv = (g(a + "query_key_value.weight") @ h[t]).view(-1, hd)
            q = qkv[: cfg.num_attention_heads]
            k = qkv[cfg.num_attention_heads : cfg.num_attention_heads + cfg.num_key_value_heads]
            v = qkv[cfg.num_attention_heads + cfg.num_key_value_heads :]
            q = torch.stack([rope(norm(q[i], g(a + "query_layernorm.weight")), t) for i in range(len(q))])
            k = torch.stack([rope(norm(k[i], g(a + "key_layernorm.weight")), t) for i in range(len(k))])
            qs.append(q)
            ks.append(k)
            vs.append(v)
        att = torch.zeros(n, cfg.num_attention_heads * hd, dtype=torch.float64)
        for t in range(n):
            keys = [j for j in range(n) if j // block <= t // block]
            for head in range(cfg.num_attention_heads):
                kv = head // group
                scores = torch.tensor([float(qs[t][head] @ ks[j][kv]) / math.sqrt(hd) for j in keys])
                probs = torch.softmax(scores.double(), 0)
                mixed = sum(pr * vs[j][kv] for pr, j in zip(probs, keys, strict=True))
                att[t, head * hd : (head + 1) * hd] = mixed
        x = x + att @ g(a + "dense.weight").T
        h = norm(x, g(p + "post_attention_layernorm.weight"))
        out = torch.zeros_like(x)
        picks = []
        for t in range(n):
            if layer < cfg.first_k_dense_replace:
                out[t] = mlp(h[t], p + "mlp.")
                continue
            scores = 1 / (1 + torch.exp(-(g(p + "mlp.gate.weight") @ h[t])))
            biased = scores + g(p + "mlp.gate.expert_bias")
            size = m.num_experts // m.n_group
            group_score = [sorted(biased[i * size : (i + 1) * size].tolist())[-2:] for i in range(m.n_group)]
            kept = sorted(range(m.n_group), key=lambda i: -sum(group_score[i]))[: m.topk_group]
            allowed = [e for e in range(m.num_experts) if e // size in kept]
            top = sorted(allowed, key=lambda e: -float(biased[e]))[: m.num_experts_per_tok]
            weights = [float(scores[e]) for e in top]
            total = sum(weights)
            picks.append(top)
            for e, wt in zip(top, weights, strict=True):
                out[t] += wt / total * m.routed_scaling_factor * mlp(h[t], f"{p}mlp.experts.{e}.")
            out[t] += mlp(h[t], p + "mlp.shared_experts.")
        if picks:
            chosen.append(picks)
        x = x + out
    x = norm(x, g("model.norm.weight"))
    return x @ g("lm_head.weight").T, chosen


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = random_llada2_config()
    weights = random_llada2_weights(cfg)
    path = write_llada2_checkpoint(tmp_path_factory.mktemp("llada2"), cfg, weights)
    return cfg, weights, path


def block_causal(n: int, block: int) -> torch.Tensor:
    pos = torch.arange(n)
    return (pos[None, :] // block <= pos[:, None] // block)[None]


def test_forward_matches_the_published_architecture(checkpoint):
    cfg, weights, path = checkpoint
    loaded = load_model(path)
    assert loaded.family == "llada2"
    model = loaded.model
    ids = [5, 17, 42, 99, 3, 3, 3, 250, 7, 3, 11, 64]
    block = 4
    expected, chosen = reference_logits(cfg, weights, ids, block)
    n = len(ids)
    got = model(torch.tensor([ids]), torch.arange(n)[None], block_causal(n, block))[0]
    assert torch.allclose(got.double(), expected, atol=2e-4), (got.double() - expected).abs().max()
    # The routing the reference took is the model's, token for token, in every MoE layer.
    inputs = []
    hooks = [blk.register_forward_pre_hook(lambda _m, a: inputs.append(a[0])) for blk in model.moe_blocks()]
    model(torch.tensor([ids]), torch.arange(n)[None], block_causal(n, block))
    for h in hooks:
        h.remove()
    picked = [
        route(x[0], blk.gate, blk.expert_bias, blk.cfg)[0].tolist()
        for x, blk in zip(inputs, model.moe_blocks(), strict=True)
    ]
    assert picked == chosen
    # The group limit was binding somewhere: some token's best experts by biased score were not all
    # inside its kept groups (so a plain top-k would have routed differently).
    assert _group_limit_binds(model, weights, ids, block)


def _group_limit_binds(model: LLaDA2Model, weights, ids, block) -> bool:
    cfg = model.cfg
    every_group = MoEConfig(**{**cfg.moe.__dict__, "topk_group": cfg.moe.n_group})
    unlimited = LLaDA2Model(LLaDA2Config(**{**cfg.__dict__, "moe": every_group}))
    unlimited.load_official(weights)
    n = len(ids)
    args = (torch.tensor([ids]), torch.arange(n)[None], block_causal(n, block))
    return not torch.allclose(model(*args), unlimited(*args), atol=1e-5)


def test_checkpoint_round_trip_and_recognition(checkpoint):
    cfg, weights, path = checkpoint
    model = load_model(path).model
    exported = model.export_state_dict()
    assert sorted(exported) == sorted(weights)
    assert all(torch.equal(exported[k], weights[k]) for k in weights)
    assert detect_family({"model_type": "llada2_moe"}) == "llada2"
    assert detect_family({"architectures": ["LLaDA2MoeModelLM"]}) == "llada2"
    assert detect_family({"model_type": "llada"}) == "llada"
    assert model.roles.mask_token_id == cfg.mask_token_id
    assert model.roles.eos_token_id == cfg.eos_token_id
    assert model.layers[0].moe is None  # first_k_dense_replace: a dense SwiGLU
    assert all(isinstance(layer.moe, MoEBlock) for layer in model.layers[1:])


def test_missing_and_misshapen_tensors_are_named(checkpoint):
    cfg, weights, _ = checkpoint
    model = LLaDA2Model(cfg)
    broken = dict(weights)
    del broken["model.layers.1.mlp.experts.3.up_proj.weight"]
    with pytest.raises(KeyError, match=r"experts\.3\.up_proj"):
        model.load_official(broken)
    broken = dict(weights)
    broken["model.layers.1.mlp.gate.weight"] = torch.zeros(4, 64)
    with pytest.raises(RuntimeError):
        model.load_official(broken)


def test_grouped_gemm_equals_the_per_expert_loop(checkpoint, monkeypatch):
    _, _, path = checkpoint
    model = load_model(path).model
    ids = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(20)[None].expand(3, -1)
    with torch.inference_mode():
        grouped = model(ids, pos)
        monkeypatch.setattr(moe, "GROUPED_GEMM", False)
        looped = model(ids, pos)
    assert torch.allclose(grouped, looped, atol=1e-5)


def test_routing_does_not_depend_on_the_batch():
    cfg = MoEConfig(64, 8, 2, 4, 2, 2.5, 32, 1)
    gen = torch.Generator().manual_seed(0)
    gate, bias = torch.randn(8, 64, generator=gen), 0.3 * torch.randn(8, generator=gen)
    tokens = torch.randn(40, 64, generator=gen)
    idx_all, w_all = route(tokens, gate, bias, cfg)
    for i in (0, 7, 39):
        idx, w = route(tokens[i : i + 1], gate, bias, cfg)
        assert torch.equal(idx[0], idx_all[i]) and torch.equal(w[0], w_all[i])
    # Chosen experts always lie in topk_group groups of the 4; weights sum to the scaling factor.
    groups = (idx_all // 2).tolist()
    assert all(len(set(g)) <= 2 for g in groups)
    assert torch.allclose(w_all.sum(-1), torch.full((40,), 2.5))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_group": 3}, "groups"),
        ({"topk_group": 5}, "topk_group"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ],
)
def test_impossible_routing_configs_are_refused(change, message):
    raw = {
        "model_type": "llada2_moe",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_experts": 8,
        "n_group": 4,
        "topk_group": 2,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        **change,
    }
    with pytest.raises(ValueError, match=message):
        LLaDA2Config.from_dict(raw)


def test_published_mini_config_parses():
    """LLaDA2.0-mini's config.json keys (values as published; see docs/llada2.md)."""
    raw = {
        "architectures": ["LLaDA2MoeModelLM"],
        "model_type": "llada2_moe",
        "first_k_dense_replace": 1,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 5120,
        "max_position_embeddings": 32768,
        "moe_intermediate_size": 512,
        "n_group": 8,
        "norm_head": False,
        "norm_topk_prob": True,
        "num_attention_heads": 16,
        "num_experts": 256,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 20,
        "num_key_value_heads": 4,
        "num_shared_experts": 1,
        "pad_token_id": 156892,
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1e-06,
        "rope_theta": 600000,
        "routed_scaling_factor": 2.5,
        "score_function": "sigmoid",
        "tie_word_embeddings": False,
        "topk_group": 4,
        "use_bias": False,
        "use_qkv_bias": False,
        "use_qk_norm": True,
        "vocab_size": 157184,
    }
    cfg = LLaDA2Config.from_dict(raw)
    assert (cfg.mask_token_id, cfg.eos_token_id) == (156895, 156892)
    assert cfg.rotary_dim == 64 and cfg.is_moe(1) and not cfg.is_moe(0)
