"""The native SDAR-MoE model against transformers' Qwen3-MoE (SDAR-30B-A3B's network with SDAR's mask).

Random checkpoints in the published format (``SDARMoeForCausalLM`` config keys, per-expert
``model.layers.{i}.mlp.experts.{e}.*`` tensors) are loaded by our loader; transformers'
``Qwen3MoeForCausalLM`` gets the same tensors (its experts stacked here into its fused layout) and,
under SDAR's block-causal mask built here by hand, the logits agree, for sparse and dense layers
(``mlp_only_layers``, ``decoder_sparse_step``) and with and without ``norm_topk_prob``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dllm_serve.config import EngineConfig
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.sequence import GenerationRequest
from dllm_serve.models.family import ModelShape
from dllm_serve.models.loader import detect_family, load_model, read_config
from dllm_serve.models.moe import MoEConfig, route
from dllm_serve.models.registry import get
from dllm_serve.models.sdar_moe import SDARMoeConfig, SDARMoeModel, sdar_moe_config_dict
from tests.sdar_helpers import random_sdar_moe_config, random_sdar_moe_weights, write_sdar_moe_checkpoint
from tests.unit.test_sdar_model import block_causal

CONFIGS = Path(__file__).resolve().parents[2] / "src/dllm_serve/models/configs"


def qwen3_moe_reference(cfg: SDARMoeConfig, weights: dict[str, torch.Tensor]):
    """transformers' Qwen3MoeForCausalLM with the same config; the published per-expert tensors
    stacked into its fused ``experts.gate_up_proj`` [E, 2I, H] / ``experts.down_proj`` [E, H, I]."""
    transformers = pytest.importorskip("transformers")
    raw = {k: v for k, v in sdar_moe_config_dict(cfg).items() if k not in ("architectures", "model_type")}
    qcfg = transformers.Qwen3MoeConfig(**raw)
    qcfg._attn_implementation = "eager"
    ref = transformers.Qwen3MoeForCausalLM(qcfg).eval()
    state = {k: v for k, v in weights.items() if ".mlp.experts." not in k}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        if p + "gate.weight" not in weights:
            continue
        experts = range(cfg.num_experts)
        state[p + "experts.gate_up_proj"] = torch.stack(
            [
                torch.cat(
                    [weights[f"{p}experts.{e}.gate_proj.weight"], weights[f"{p}experts.{e}.up_proj.weight"]]
                )
                for e in experts
            ]
        )
        state[p + "experts.down_proj"] = torch.stack(
            [weights[f"{p}experts.{e}.down_proj.weight"] for e in experts]
        )
    ref.load_state_dict(state, strict=True)
    return ref


LAYOUTS = {
    "all_sparse_renormalised": {},
    "not_renormalised": {"norm_topk_prob": False},
    "mlp_only_layers": {"mlp_only_layers": (1,)},
    "decoder_sparse_step_2": {"decoder_sparse_step": 2},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_forward_matches_qwen3_moe_with_block_causal_mask(tmp_path, layout) -> None:
    cfg = random_sdar_moe_config(**LAYOUTS[layout])
    weights = random_sdar_moe_weights(cfg)
    loaded = load_model(write_sdar_moe_checkpoint(tmp_path / "m", cfg, weights))
    assert loaded.family == "sdar-moe" and isinstance(loaded.model, SDARMoeModel)
    sparse = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)]
    assert sparse == {"mlp_only_layers": [0, 2], "decoder_sparse_step_2": [1]}.get(layout, [0, 1, 2])
    ref = qwen3_moe_reference(cfg, weights)
    n = 14
    ids = torch.randint(0, cfg.vocab_size, (2, n), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(n)[None].expand(2, -1)
    mask = block_causal(n, cfg.block_size)
    additive = torch.zeros(1, 1, n, n).masked_fill(~mask, float("-inf"))
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=additive, position_ids=pos).logits
        got = loaded.model(ids, pos, mask[None].expand(2, -1, -1))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # Every expert of every sparse layer ran on some token: the comparison covers all of them.
    assert all(int((blk.last_counts > 0).sum()) == cfg.num_experts for blk in loaded.model.moe_blocks())


def test_renormalisation_is_what_changes_the_output(tmp_path) -> None:
    """norm_topk_prob true and false give different logits on the same weights (the flag is read)."""
    outs = []
    for norm in (True, False):
        cfg = random_sdar_moe_config(norm_topk_prob=norm)
        path = write_sdar_moe_checkpoint(tmp_path / str(norm), cfg, random_sdar_moe_weights(cfg))
        ids = torch.arange(4, 16)[None]
        with torch.no_grad():
            outs.append(load_model(path).model(ids, torch.arange(12)[None]))
    assert (outs[0] - outs[1]).abs().max() > 1e-2


def test_published_tensor_names_round_trip(tmp_path) -> None:
    cfg = random_sdar_moe_config(mlp_only_layers=(1,))
    weights = random_sdar_moe_weights(cfg)
    path = write_sdar_moe_checkpoint(tmp_path / "m", cfg, weights)
    raw = read_config(path)
    assert raw["architectures"] == ["SDARMoeForCausalLM"] and raw["model_type"] == "sdar_moe"
    assert (
        detect_family(raw) == "sdar-moe"
        and detect_family({"architectures": ["SDARMoeForCausalLM"]}) == "sdar-moe"
    )
    names = set(weights)
    # Qwen3-MoE's names: a router and per-expert SwiGLU tensors in sparse layers, SDAR's dense MLP in layer 1.
    assert (
        "model.layers.0.mlp.gate.weight" in names and "model.layers.2.mlp.experts.3.down_proj.weight" in names
    )
    assert weights["model.layers.0.mlp.experts.1.gate_proj.weight"].shape == (32, 64)
    assert weights["model.layers.0.mlp.experts.1.down_proj.weight"].shape == (64, 32)
    assert "model.layers.1.mlp.gate_proj.weight" in names and "model.layers.1.mlp.gate.weight" not in names
    assert not any("expert_bias" in n or "shared_expert" in n for n in names)
    loaded = load_model(path)
    exported = loaded.model.export_state_dict()
    assert sorted(exported) == sorted(weights)
    assert all(torch.equal(exported[k], weights[k]) for k in weights)
    assert Engine(loaded).model_defaults == {"block_length": 4}


def test_routing_is_softmax_top_k_and_does_not_depend_on_the_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    gate, tokens = torch.randn(16, 64, generator=gen), torch.randn(40, 64, generator=gen)
    for norm in (True, False):
        cfg = MoEConfig(64, 16, 4, 1, 1, 1.0, 32, score_function="softmax", norm_topk_prob=norm)
        idx_all, w_all = route(tokens, gate, None, cfg)
        for i in (0, 7, 39):
            idx, w = route(tokens[i : i + 1], gate, None, cfg)
            assert torch.equal(idx[0], idx_all[i]) and torch.equal(w[0], w_all[i])
        probs = torch.softmax(tokens.double() @ gate.double().T, dim=-1)
        top = probs.topk(4, dim=-1)
        assert torch.equal(idx_all, top.indices)
        want = top.values / top.values.sum(-1, keepdim=True) if norm else top.values
        torch.testing.assert_close(w_all.double(), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"shared_expert_intermediate_size": 512}, "shared_expert_intermediate_size"),
        ({"scoring_func": "sigmoid"}, "scoring_func"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step"),
        ({"mlp_only_layers": [7]}, "mlp_only_layers"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mask_token_id": None}, "mask_token_id"),
    ],
)
def test_unsupported_configs_are_clear_errors(tmp_path, change, message) -> None:
    cfg = random_sdar_moe_config()
    path = write_sdar_moe_checkpoint(tmp_path / "m", cfg, random_sdar_moe_weights(cfg))
    raw = json.loads((path / "config.json").read_text())
    raw.update(change)
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        load_model(path)


def test_training_only_keys_are_ignored() -> None:
    raw = sdar_moe_config_dict(random_sdar_moe_config())
    base = SDARMoeConfig.from_dict(raw)
    assert SDARMoeConfig.from_dict({**raw, "output_router_logits": True, "router_aux_loss_coef": 0.5}) == base


def test_real_size_config_shape_and_parameters() -> None:
    """The shipped SDAR-30B-A3B config: 30.5 B parameters (3.3 B active per token), every layer sparse."""
    raw = read_config(CONFIGS / "sdar-30b-a3b-chat")
    cfg = SDARMoeConfig.from_dict(raw)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.norm_topk_prob) == (
        128,
        8,
        768,
        True,
    )
    assert all(cfg.is_moe(i) for i in range(48)) and (cfg.mask_token_id, cfg.block_size) == (151669, 4)
    with torch.device("meta"):
        model = SDARMoeModel(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert 30.4e9 < total < 30.6e9
    shape = get("sdar-moe").cost_shape(raw)
    assert isinstance(shape, ModelShape) and (shape.experts, shape.active_experts) == (128, 8)
    stored = shape.n_layers * shape.layer_stored_params + shape.head_params + shape.d_model * shape.vocab_size
    assert abs(stored - total) / total < 1e-3  # the cost model counts the same weights (norms aside)


def test_cached_block_causal_steps_match_a_full_masked_forward(tmp_path) -> None:
    """The aligned cache on SDAR-MoE: each step's block logits equal a from-scratch forward under
    the hand-built mask (SDAR's presets and cache policy unchanged on the MoE stack)."""
    cfg = random_sdar_moe_config()
    loaded = load_model(write_sdar_moe_checkpoint(tmp_path / "m", cfg, random_sdar_moe_weights(cfg)))
    model = loaded.model
    engine = Engine(loaded, EngineConfig(max_batch_size=2))
    params = engine.resolve_params(10, {"temperature": 0.0, "early_stop": False}, "sdar")
    prompt = [(7 * i + 5) % 300 + 4 for i in range(7)]
    seq = engine.runner.new_sequence(GenerationRequest("r", prompt, params, 10))
    captured: dict[str, torch.Tensor] = {}
    original = model.logits

    def spy(hidden: torch.Tensor) -> torch.Tensor:
        captured["logits"] = original(hidden)
        return captured["logits"]

    model.logits = spy  # type: ignore[method-assign]
    steps = 0
    try:
        while not seq.finished:
            start, canvas = seq.block_start, seq.canvas.clone()
            engine.runner.step([seq])
            end = start + 4
            with torch.no_grad():
                full = original(
                    model.hidden_states(
                        canvas[None, :end], torch.arange(end)[None], block_causal(end, 4)[None]
                    )
                )
            torch.testing.assert_close(captured["logits"][0, :4], full[0, start:end], atol=1e-4, rtol=1e-4)
            steps += 1
            seq.pop_events()
    finally:
        del model.logits
        engine.runner.release(seq)
    assert steps >= 3
