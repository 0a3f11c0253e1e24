"""Small builders shared by tests: random tiny checkpoints of any registered family in its official
format (``random_checkpoint``), and the LLaDA shortcuts most tests use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dllm_serve.config import DEFAULT_MODEL
from dllm_serve.models import registry
from dllm_serve.models.llada import LLaDAConfig, llada_config_dict
from dllm_serve.models.tokenizer import ChatTokenizer

REPO = Path(__file__).resolve().parents[1]
TINY_LLADA = DEFAULT_MODEL
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def random_llada_config(vocab: int = 368, **overrides) -> LLaDAConfig:
    base = dict(
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=4,
        mlp_hidden_size=96,
        vocab_size=vocab,
        embedding_size=vocab,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_sequence_length=256,
        mask_token_id=5,
        eos_token_id=1,
        pad_token_id=1,
    )
    base.update(overrides)
    return LLaDAConfig(**base)


def random_like(
    reference: dict[str, torch.Tensor], seed: int, scale: float, norm_jitter: float
) -> dict[str, torch.Tensor]:
    """Random tensors with ``reference``'s names and shapes: norm vectors 1 + jitter (away from 1, so
    a wrong mapping shows), matrices N(0, scale)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in reference.items():
        if t.dim() == 1:
            out[name] = 1.0 + norm_jitter * torch.randn(t.shape, generator=gen)
        else:
            out[name] = torch.randn(t.shape, generator=gen) * scale
    return out


def random_weights(
    config: dict, tokenizer_from: Path, seed: int = 0, scale: float = 0.2, norm_jitter: float = 0.1
) -> dict[str, torch.Tensor]:
    """Official-name tensors of a random model of the family config.json names (its spec builds the
    model on the meta device; the family's weight table gives the names and shapes)."""
    spec = registry.get(registry.detect_family(config))
    with torch.device("meta"):
        model = spec.build(config, ChatTokenizer(tokenizer_from))
    return random_like(model.export_state_dict(), seed, scale, norm_jitter)


def random_checkpoint(
    directory: Path,
    config: dict,
    tokenizer_from: Path,
    *,
    seed: int = 0,
    scale: float = 0.2,
    norm_jitter: float = 0.1,
    shards: int = 1,
) -> Path:
    """A checkpoint of any registered family: ``config`` (config.json in the family's format),
    random weights under its official names, and ``tokenizer_from``'s tokenizer files."""
    tensors = random_weights(config, tokenizer_from, seed, scale, norm_jitter)
    return write_checkpoint(directory, config, tokenizer_from, TOKENIZER_FILES, tensors, shards=shards)


def random_official_weights(cfg: LLaDAConfig, seed: int = 0, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Official-name tensors of a random LLaDA."""
    return random_weights(llada_config_dict(cfg), TINY_LLADA, seed, scale, norm_jitter=0.1)


def write_checkpoint(
    directory: Path,
    config: dict,
    tokenizer_from: Path,
    tokenizer_files: tuple[str, ...],
    tensors: dict[str, torch.Tensor],
    *,
    shards: int = 1,
) -> Path:
    """A checkpoint directory: config.json, tokenizer files copied from ``tokenizer_from``, and the
    tensors in one model.safetensors or ``shards`` files with a model.safetensors.index.json."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for name in tokenizer_files:
        shutil.copy(tokenizer_from / name, directory / name)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
        return directory
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(directory / fname))
        weight_map.update({n: fname for n in part})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return directory


def write_llada_checkpoint(
    directory: Path, cfg: LLaDAConfig, tensors: dict[str, torch.Tensor], *, shards: int = 1
) -> Path:
    """A checkpoint directory in GSAI-ML/LLaDA's format, with the bundled model's tokenizer."""
    config = llada_config_dict(cfg)
    return write_checkpoint(directory, config, TINY_LLADA, TOKENIZER_FILES, tensors, shards=shards)


def small_qwen_shape(tokenizer_dir: Path, mask_token: str, **extra: Any) -> dict[str, Any]:
    """Config fields of a tiny Qwen-shaped model (2 layers, GQA 4:2) with the special-token ids of
    the bundled tokenizer in ``tokenizer_dir``; each family's test helper adds its own keys."""
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    shape: dict[str, Any] = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        vocab_size=len(vocab["model"]["vocab"]),
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        mask_token_id=ids[mask_token],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    shape.update(extra)
    return shape
