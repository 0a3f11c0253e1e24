"""The native Dream model against transformers' Qwen2 run without a causal mask, and its checkpoint format.

Dream's published modeling file is Qwen2's decoder with ``is_causal = False`` and the same tensor
names, so transformers' own ``Qwen2ForCausalLM`` given an all-visible 4-D attention mask is an
independent reference for the forward (the published checkpoint's state dict loads into it with
``strict=True``).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from dllm_serve.models.dream import DreamModel
from dllm_serve.models.loader import CheckpointLoadError, detect_family, load_model
from dllm_serve.models.tokenizer import ChatTokenizer
from tests.dream_helpers import (
    TOKENIZER_FROM,
    random_dream_config,
    random_dream_weights,
    special_ids,
    write_dream_checkpoint,
)


def qwen2_reference(cfg, weights: dict[str, torch.Tensor]) -> transformers.Qwen2ForCausalLM:
    config = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
    )
    ref = transformers.Qwen2ForCausalLM(config).eval()
    ref.load_state_dict(weights, strict=True)  # the published names are Qwen2's
    return ref


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_forward_matches_qwen2_without_causal_mask(kv_heads):
    cfg = random_dream_config(num_key_value_heads=kv_heads)
    weights = random_dream_weights(cfg)
    model = DreamModel(cfg)
    model.load_official(weights)
    model.eval()
    ref = qwen2_reference(cfg, weights)
    ids = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(13)[None].expand(2, -1)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=torch.zeros(2, 1, 13, 13), position_ids=pos).logits
        causal = ref(input_ids=ids, position_ids=pos).logits
        got = model(ids, pos)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - causal).abs().max() > 1e-2  # the reference's mask matters: Dream is not causal
    # The LM head runs on the requested positions only.
    index = torch.tensor([[0, 5], [12, 3]])
    with torch.no_grad():
        picked = model(ids, pos, None, None, index)
    torch.testing.assert_close(picked, expected.gather(1, index[..., None].expand(-1, -1, cfg.vocab_size)))


def test_checkpoint_round_trip_and_loader(tmp_path):
    cfg = random_dream_config()
    weights = random_dream_weights(cfg)
    path = write_dream_checkpoint(tmp_path / "dream", cfg, weights, shards=2)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "Dream" and config["architectures"] == ["DreamModel"]
    assert detect_family(config) == "dream"
    loaded = load_model(path)
    assert loaded.family == "dream"
    assert loaded.decode_defaults == {"shift_logits": True}
    exported = loaded.model.export_state_dict()
    assert set(exported) == set(weights)
    for name, tensor in weights.items():
        torch.testing.assert_close(exported[name], tensor)
    ids = special_ids()
    roles = loaded.model.roles
    assert (roles.mask_token_id, roles.eos_token_id, roles.eot_token_id) == (
        ids["<|mask|>"],
        ids["<|endoftext|>"],
        ids["<|im_end|>"],
    )


def test_missing_tensor_is_named(tmp_path):
    cfg = random_dream_config()
    weights = random_dream_weights(cfg)
    del weights["model.layers.1.self_attn.k_proj.bias"]
    path = write_dream_checkpoint(tmp_path / "dream", cfg, weights)
    with pytest.raises(CheckpointLoadError, match=r"k_proj\.bias"):
        load_model(path)


def test_unsupported_options_are_refused(tmp_path):
    cfg = random_dream_config()
    path = write_dream_checkpoint(tmp_path / "dream", cfg, random_dream_weights(cfg))
    config = json.loads((path / "config.json").read_text())
    config["use_sliding_window"] = True
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="use_sliding_window"):
        load_model(path)


def test_dream_tokenizer_class_loads_without_remote_code(tmp_path):
    """Dream ships its tokenizer as remote code (``DreamTokenizer``: Qwen2's byte-level BPE over
    vocab.json + merges.txt); it loads natively as Qwen2's tokenizer. DiffuCoder's ``<|dlm_pad|>``
    padding ends an answer like eos and ``<|im_end|>``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER_FROM / "tokenizer.json"))
    tok.add_special_tokens(["<|dlm_pad|>"])
    tok.model.save(str(tmp_path))
    specials = {**special_ids(), "<|dlm_pad|>": tok.token_to_id("<|dlm_pad|>")}
    config = {
        "tokenizer_class": "DreamTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "added_tokens_decoder": {
            str(i): {"content": name, "special": True, "normalized": False, "lstrip": False, "rstrip": False}
            for name, i in specials.items()
        },
        "eos_token": "<|im_end|>",
        "pad_token": "<|dlm_pad|>",
        "mask_token": "<|mask|>",
        "chat_template": json.loads((TOKENIZER_FROM / "tokenizer_config.json").read_text())["chat_template"],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    chat = ChatTokenizer(tmp_path)  # no tokenization_dream.py here: no remote code could run
    ids = chat.render_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == specials["<|im_start|>"]
    assert chat.hf.decode(ids).endswith("<|im_start|>assistant\n")
    assert set(chat.stop_ids(specials["<|endoftext|>"])) == {
        specials["<|endoftext|>"],
        specials["<|im_end|>"],
        specials["<|dlm_pad|>"],
    }
