"""The native SDAR model against transformers' Qwen3 (SDAR's modeling code is Qwen3's with a mask).

A random checkpoint in the published format (config.json keys, ``model.*`` / ``lm_head`` tensor
names, ``<|MASK|>`` tokenizer) is loaded by our loader and by ``Qwen3ForCausalLM``; with SDAR's
block-causal mask built here by hand the logits agree. The engine's cached ``aligned`` plan is
checked against the same hand-built mask.
"""

from __future__ import annotations

import json

import pytest
import torch

from dllm_serve.config import EngineConfig
from dllm_serve.engine.engine import Engine
from dllm_serve.engine.sequence import GenerationRequest, canvas_length
from dllm_serve.models.loader import CheckpointLoadError, detect_family, load_model
from dllm_serve.models.sdar import SDARConfig, SDARModel, sdar_config_dict
from tests.sdar_helpers import TINY_SDAR, random_sdar_config, random_sdar_weights, write_sdar_checkpoint


def block_causal(n: int, block: int) -> torch.Tensor:
    """SDAR's mask: query i sees key j when j's block (absolute positions) is not after i's."""
    q = torch.arange(n)
    return q[None, :] // block <= q[:, None] // block


def qwen3_reference(cfg: SDARConfig, weights: dict[str, torch.Tensor]):
    """transformers' Qwen3ForCausalLM with the same config and tensors (names load unchanged)."""
    transformers = pytest.importorskip("transformers")
    raw = {k: v for k, v in sdar_config_dict(cfg).items() if k not in ("architectures", "model_type")}
    qcfg = transformers.Qwen3Config(**raw)
    qcfg._attn_implementation = "eager"
    ref = transformers.Qwen3ForCausalLM(qcfg).eval()
    ref.load_state_dict(weights, strict=True)
    return ref


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    cfg = random_sdar_config()
    weights = random_sdar_weights(cfg)
    path = write_sdar_checkpoint(tmp_path_factory.mktemp("sdar") / "m", cfg, weights)
    return cfg, weights, path


def test_forward_matches_qwen3_with_block_causal_mask(checkpoint) -> None:
    cfg, weights, path = checkpoint
    loaded = load_model(path)
    assert loaded.family == "sdar" and isinstance(loaded.model, SDARModel)
    ref = qwen3_reference(cfg, weights)
    n = 14
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(n)[None]
    mask = block_causal(n, cfg.block_size)
    additive = torch.zeros(1, 1, n, n).masked_fill(~mask, float("-inf"))
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=additive, position_ids=pos).logits
        got = loaded.model(ids, pos, mask[None])
        full = loaded.model(ids, pos, torch.ones(1, n, n, dtype=torch.bool))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (full - expected).abs().max() > 1e-2  # the mask matters: full attention differs


def test_published_format_round_trip_and_roles(checkpoint) -> None:
    _, weights, path = checkpoint
    raw = json.loads((path / "config.json").read_text())
    assert raw["architectures"] == ["SDARForCausalLM"] and raw["model_type"] == "sdar"
    assert raw["block_size"] == 4 and detect_family(raw) == "sdar"
    loaded = load_model(path)
    exported = loaded.model.export_state_dict()
    assert sorted(exported) == sorted(weights)
    assert all(torch.equal(exported[k], weights[k]) for k in weights)
    vocab = json.loads((TINY_SDAR / "tokenizer.json").read_text())
    names = {t["id"]: t["content"] for t in vocab["added_tokens"]}
    roles = loaded.model.roles
    assert names[roles.mask_token_id] == "<|MASK|>"
    assert {names[t] for t in roles.stop_token_ids} == {"<|endoftext|>", "<|im_end|>"}
    assert Engine(loaded).model_defaults == {"block_length": 4}


def test_published_config_parses() -> None:
    """JetLM/SDAR-1.7B-Chat's config.json (the keys that define the network, as published)."""
    raw = {
        "architectures": ["SDARForCausalLM"],
        "attention_bias": False,
        "block_size": 4,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "mask_token_id": 151669,
        "max_position_embeddings": 32768,
        "model_type": "sdar",
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }
    cfg = SDARConfig.from_dict(raw)
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (151669, 151643, 151643)
    assert cfg.block_size == 4
    assert (cfg.num_key_value_heads, cfg.head_dim) == (8, 128)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_experts": 128}, "sdar_moe"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"mask_token_id": None}, "mask_token_id"),
    ],
)
def test_unsupported_configs_are_clear_errors(checkpoint, tmp_path, change, message) -> None:
    cfg, weights, _ = checkpoint
    path = write_sdar_checkpoint(tmp_path / "m", cfg, weights)
    raw = json.loads((path / "config.json").read_text())
    raw.update(change)
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        load_model(path)


def test_missing_tensor_names_the_tensor(checkpoint, tmp_path) -> None:
    cfg, weights, _ = checkpoint
    partial = {k: v for k, v in weights.items() if k != "model.layers.1.self_attn.k_norm.weight"}
    path = write_sdar_checkpoint(tmp_path / "m", cfg, partial)
    with pytest.raises(CheckpointLoadError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight"):
        load_model(path)


@pytest.mark.parametrize("prompt_len", [5, 8, 11])
def test_cached_block_causal_steps_match_a_full_masked_forward(checkpoint, prompt_len) -> None:
    """Each engine step's block logits equal a from-scratch forward of the canvas so far under the
    hand-built block-causal mask: the cache holds exactly SDAR's K/V, the first block starts inside
    the prompt when its length is not a multiple of 4, and the canvas ends on a block boundary."""
    _, _, path = checkpoint
    loaded = load_model(path)
    model = loaded.model
    engine = Engine(loaded, EngineConfig(max_batch_size=2))
    params = engine.resolve_params(10, {"temperature": 0.0, "early_stop": False}, "sdar")
    assert params.block_length == 4
    prompt = [(7 * i + 5) % 300 + 4 for i in range(prompt_len)]
    seq = engine.runner.new_sequence(GenerationRequest("r", prompt, params, 10))
    assert seq.length == canvas_length(prompt_len, params) and seq.length % 4 == 0
    assert seq.block_start == prompt_len // 4 * 4
    seen = []
    captured: dict[str, torch.Tensor] = {}
    original = model.logits

    def spy(hidden: torch.Tensor) -> torch.Tensor:
        out = original(hidden)
        captured["logits"] = out
        return out

    model.logits = spy  # type: ignore[method-assign]
    try:
        while not seq.finished:
            start, canvas = seq.block_start, seq.canvas.clone()
            engine.runner.step([seq])
            end = start + 4
            mask = block_causal(end, 4)
            with torch.no_grad():
                full = original(model.hidden_states(canvas[None, :end], torch.arange(end)[None], mask[None]))
            torch.testing.assert_close(captured["logits"][0, :4], full[0, start:end], atol=1e-4, rtol=1e-4)
            seen.append(start)
            seq.pop_events()
    finally:
        del model.logits
        engine.runner.release(seq)
    assert seen[0] == prompt_len // 4 * 4 and seen[-1] + 4 <= seq.length
