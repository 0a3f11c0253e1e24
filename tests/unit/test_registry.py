"""The family registry (models/registry.py) and the declarative weight tables (models/base.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dllm_serve.bench.hardware import shape_from_config
from dllm_serve.engine.algorithms import PRESETS, default_preset, presets_for
from dllm_serve.models import registry
from dllm_serve.models.base import DecoderLayer, DiffusionLM, RotaryEmbedding, TokenRoles, WeightNames
from dllm_serve.models.family import ATTENTION_KINDS, TinyShape
from dllm_serve.models.loader import load_model
from tests.helpers import random_checkpoint

REPO = Path(__file__).resolve().parents[2]
TRAINED = [spec for spec in registry.FAMILIES if spec.tiny is not None]


@pytest.mark.parametrize("spec", registry.FAMILIES, ids=lambda s: s.name)
def test_every_family_is_complete(spec) -> None:
    assert registry.get(spec.name) is spec
    assert spec.attention in ATTENTION_KINDS
    assert presets_for(spec.name), "no preset declares the family's attention"
    assert PRESETS[spec.default_preset] in presets_for(spec.name)
    assert default_preset("auto", spec.name) == spec.default_preset
    for model_type in spec.model_types:
        assert registry.detect_family({"model_type": model_type}) == spec.name


@pytest.mark.parametrize("spec", TRAINED, ids=lambda s: s.name)
def test_random_checkpoint_of_the_tiny_format_loads_as_its_family(tmp_path, spec) -> None:
    """The trainer's config writer, the test builder and the loader agree for every trainable family."""
    tokenizer = REPO / "models" / f"tiny-{spec.name}"
    vocab = json.loads((tokenizer / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    shape = TinyShape(
        d_model=32,
        layers=1,
        heads=4,
        kv_heads=spec.tiny.default_kv_heads or 4,
        mlp=48,
        vocab_size=len(vocab["model"]["vocab"]),
        max_length=128,
        eos=ids[spec.tiny.eos],
        eot=ids[spec.tiny.eot],
        mask=ids[spec.tiny.mask],
        block_size=8,
    )
    config = spec.tiny.config(shape)
    path = random_checkpoint(tmp_path / spec.name, config, tokenizer, shards=2)
    loaded = load_model(path)
    assert loaded.family == spec.name
    assert loaded.model.roles.mask_token_id == shape.mask
    assert shape_from_config(config).n_kv_heads == shape.kv_heads
    assert torch.isfinite(loaded.model(torch.tensor([[1, 2, 3]]), torch.arange(3)[None])).all()


def test_unknown_config_lists_the_registered_families() -> None:
    with pytest.raises(ValueError, match="supported: ") as info:
        registry.detect_family({"model_type": "gpt2"})
    for spec in registry.FAMILIES:
        assert spec.title in str(info.value)


class _BiasModel(DiffusionLM):
    """A two-layer model with q/k/v and output biases, partial rotary and fused names, as a family
    with Qwen2-style attention would declare it."""

    weight_names = WeightNames(
        top={"embed.weight": "m.embed", "norm": "m.norm", "head.weight": "lm_head"},
        layers={
            "attn_norm": "m.{i}.ln1",
            "mlp_norm": "m.{i}.ln2",
            "qkv.weight": ("m.{i}.q.w", "m.{i}.k.w", "m.{i}.v.w"),
            "qkv.bias": ("m.{i}.q.b", "m.{i}.k.b", "m.{i}.v.b"),
            "o_proj.weight": "m.{i}.o.w",
            "o_proj.bias": "m.{i}.o.b",
            "gate_up.weight": ("m.{i}.gate", "m.{i}.up"),
            "down.weight": "m.{i}.down",
        },
    )
    title = "test"

    def __init__(self) -> None:
        super().__init__()
        self.roles = TokenRoles.from_ids(0, 1, 1, None)
        self.vocab_size, self.max_length, self.num_layers = 40, 64, 2
        self.num_kv_heads, self.head_dim, self.norm_eps = 2, 8, 1e-6
        self.embed = torch.nn.Embedding(40, 32)
        self.layers = torch.nn.ModuleList(
            DecoderLayer(32, 4, 2, 8, 48, 1e-6, False, qkv_bias=True, o_bias=True) for _ in range(2)
        )
        self.norm = torch.nn.Parameter(torch.ones(32))
        self.head = torch.nn.Linear(32, 40, bias=False)
        self.rotary = RotaryEmbedding(4, 10000.0)  # partial rotary: 4 of 8 dimensions


def test_weight_table_round_trips_fused_biased_parameters() -> None:
    torch.manual_seed(0)
    model = _BiasModel()
    for p in model.parameters():
        torch.nn.init.normal_(p)
    exported = model.export_state_dict()
    assert exported["m.0.q.b"].shape == (32,) and exported["m.0.k.b"].shape == (16,)
    assert torch.equal(exported["m.1.v.b"], model.layers[1].qkv.bias[48:])
    assert exported["m.0.gate"].shape == (48, 32)
    fresh = _BiasModel()
    fresh.load_official(exported)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.tensor([[3, 4, 5, 6]])
    assert torch.equal(model(ids, torch.arange(4)[None]), fresh(ids, torch.arange(4)[None]))
    with pytest.raises(KeyError, match=r"missing tensor 'm\.1\.k\.b'"):
        fresh.load_official({k: v for k, v in exported.items() if k != "m.1.k.b"})
    with pytest.raises(KeyError, match=r"does not use: \['extra'\]"):
        fresh.load_official({**exported, "extra": torch.zeros(1)})


def test_a_parameter_missing_from_the_table_is_a_bug_named() -> None:
    model = _BiasModel()
    model.layers[0].extra = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(TypeError, match=r"layers\.0\.extra"):
        model.weight_map()
