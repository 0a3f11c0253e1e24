"""Nemotron-Labs-Diffusion's native model against transformers' Ministral-3 (an independent
implementation of the same backbone: YaRN RoPE from transformers' own rope functions, Llama-4
query scaling, GQA), under the three attention patterns the decoding modes use."""

from __future__ import annotations

import pytest
import torch

from dllm_serve.models.loader import CheckpointLoadError, detect_family, load_model
from dllm_serve.models.nemotron_labs import NemotronLabsConfig, labs_config_dict
from tests.nemotron_labs_helpers import random_labs_config, random_labs_weights, write_labs_checkpoint

transformers = pytest.importorskip("transformers")


def reference_logits(
    cfg: NemotronLabsConfig, tensors: dict, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Logits of transformers' Ministral3Model (eager attention, our boolean [B, Q, K] mask) + the head."""
    from transformers.models.ministral3 import Ministral3Config, Ministral3Model

    rope = cfg.rope.to_dict()
    hf_cfg = Ministral3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope,
        attn_implementation="eager",
    )
    model = Ministral3Model(hf_cfg).double().eval()
    state = {k.removeprefix("encoder."): v.double() for k, v in tensors.items() if k.startswith("encoder.")}
    model.load_state_dict(state, strict=True)
    additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))[:, None]
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=additive).last_hidden_state
    return hidden @ tensors["diffusion_head.weight"].double().T


def masks(n: int, block: int) -> dict[str, torch.Tensor]:
    """Causal (AR, commit, verify), bidirectional (full canvas) and causal context + bidirectional
    last block (the diffusion step and the draft)."""
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    last = causal.clone()
    last[n - block :, :] = True
    return {"causal": causal, "full": torch.ones(n, n, dtype=torch.bool), "block": last}


@pytest.mark.parametrize("pattern", ["causal", "full", "block"])
def test_forward_matches_transformers_ministral3(tmp_path, pattern):
    cfg = random_labs_config()
    tensors = random_labs_weights(cfg)
    path = write_labs_checkpoint(tmp_path / "ckpt", cfg, tensors)
    loaded = load_model(path)
    assert loaded.family == "nemotron-labs"
    n = 40  # past original_max_position_embeddings (16): YaRN and the query scale both matter
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, cfg.vocab_size, (2, n), generator=gen)
    mask = masks(n, 8)[pattern][None].expand(2, n, n)
    ours = loaded.model(ids, torch.arange(n)[None].expand(2, n), mask)
    ref = reference_logits(cfg, tensors, ids, mask)
    assert torch.allclose(ours.double(), ref, atol=2e-4, rtol=1e-4), (ours.double() - ref).abs().max()


def test_query_scale_and_yarn_are_not_no_ops(tmp_path):
    """The reference check would pass for a model that ignores rope_parameters if they had no
    effect here; they do."""
    cfg = random_labs_config()
    plain = random_labs_config(rope=type(cfg.rope)(rope_theta=10000.0))
    tensors = random_labs_weights(cfg)
    a = load_model(write_labs_checkpoint(tmp_path / "a", cfg, tensors)).model
    b = load_model(write_labs_checkpoint(tmp_path / "b", plain, tensors)).model
    ids = torch.randint(4, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(40)[None]
    assert not torch.allclose(a(ids, pos), b(ids, pos), atol=1e-3)
    assert a.query_scale(pos)[0, 0, :16].eq(1).all() and a.query_scale(pos)[0, 0, 16:].gt(1).all()


def test_family_config_round_trip_and_errors(tmp_path):
    cfg = random_labs_config()
    raw = labs_config_dict(cfg)
    assert detect_family(raw) == "nemotron-labs"
    assert NemotronLabsConfig.from_dict(raw) == cfg
    for change, message in [
        ({"attention_bias": True}, "attention_bias"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"dlm_paradigm": "sbd_block_diff"}, "dlm_paradigm"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e6}}, "llama3"),
    ]:
        with pytest.raises(ValueError, match=message):
            NemotronLabsConfig.from_dict({**raw, **change})
    with pytest.raises(ValueError, match="mask_token_id"):
        NemotronLabsConfig.from_dict({**raw, "mask_token_id": -1})
    tensors = random_labs_weights(cfg)
    tensors["encoder.layers.0.self_attn.q_norm.weight"] = torch.ones(cfg.head_dim)
    with pytest.raises(CheckpointLoadError, match="q_norm"):
        load_model(write_labs_checkpoint(tmp_path / "extra", cfg, tensors))


def test_the_tokenizers_own_eos_stops_generation_too(tmp_path):
    """The published loops stop at ``tokenizer.eos_token_id``; config.json's eos (11 for the real
    checkpoints) need not be that token, so both are stop ids."""
    import json
    import shutil
    from pathlib import Path

    from dllm_serve.models.tokenizer import ChatTokenizer

    shipped = Path(__file__).parents[2] / "src/dllm_serve/models/configs/nemotron-labs-diffusion-8b"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shipped / name, tmp_path / name)
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    settings["eos_token"] = "</s>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    config_eos = json.loads((shipped / "config.json").read_text())["eos_token_id"]
    assert config_eos == 11
    assert ChatTokenizer(tmp_path).stop_ids(config_eos) == (11, 2)
