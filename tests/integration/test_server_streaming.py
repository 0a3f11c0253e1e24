"""ChoiceText with the bundled model's real byte-level tokenizer: deltas never split a character,
stop strings cut the text and count usage up to the token that completed them."""

from __future__ import annotations

import pytest

from dllm_serve.models.tokenizer import ChatTokenizer
from dllm_serve.server.choice_text import REPLACEMENT, ChoiceText
from tests.helpers import TINY_LLADA


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer(TINY_LLADA)


def _feed(tok: ChatTokenizer, text: ChoiceText, ids: list[int], step: int) -> list[str]:
    deltas = [text.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    deltas.append(text.finish())
    return [d for d in deltas if d]


@pytest.mark.parametrize("step", [1, 2, 3])
def test_multibyte_characters_are_never_split(tok: ChatTokenizer, step: int) -> None:
    source = "naïve café 日本語 🙂 ok"
    ids = tok.encode(source)
    assert len(ids) > len(source.encode()) // 2  # the tokenizer really splits these bytes
    assert any(REPLACEMENT in tok.decode(ids[:k]) for k in range(1, len(ids)))  # partial prefixes exist
    deltas = _feed(tok, ChoiceText(tok, []), ids, step)
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == source


def test_stop_string_cuts_text_and_counts_tokens_to_its_end(tok: ChatTokenizer) -> None:
    source = "a b c STOP d e f"
    ids = tok.encode(source)
    text = ChoiceText(tok, ["STOP", "zzz"])
    deltas = _feed(tok, text, ids, 1)
    assert "".join(deltas) == "a b c "
    assert text.stop_hit == "STOP"
    # usage: the shortest token prefix whose text contains the stop string
    needed = next(k for k in range(1, len(ids) + 1) if "STOP" in tok.decode(ids[:k]))
    assert text.completion_tokens(stopped_on_token=False) == needed < len(ids)


def test_stop_string_prefix_is_held_back_until_decided(tok: ChatTokenizer) -> None:
    ids = tok.encode("x ST y STOP")
    text = ChoiceText(tok, ["STOP"])
    out = ""
    for t in ids:
        out += text.add([t])
        assert "STOP" not in out
        assert not out.endswith(("S", "ST", "STO"))  # could still grow into the stop string
    out += text.finish()
    assert out == "x ST y "


def test_stop_string_spanning_token_boundaries_and_multibyte(tok: ChatTokenizer) -> None:
    source = "日本語です。終わり。次"
    ids = tok.encode(source)
    text = ChoiceText(tok, ["終わり"])
    deltas = _feed(tok, text, ids, 2)
    assert "".join(deltas) == "日本語です。"
    assert all(REPLACEMENT not in d for d in deltas)


def test_usage_counts_stop_token_without_stop_string(tok: ChatTokenizer) -> None:
    ids = tok.encode("hello")
    text = ChoiceText(tok, [])
    _feed(tok, text, ids, 1)
    assert text.completion_tokens(stopped_on_token=True) == len(ids) + 1
    assert text.completion_tokens(stopped_on_token=False) == len(ids)
