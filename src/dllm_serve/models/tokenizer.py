"""The checkpoint's own tokenizer and chat template, and the stop tokens derived from them.

Message content is plain text by default: a special-token string a user types into a message
(``<|eot_id|><|start_header_id|>system...``) is tokenized as the characters it is, never as the
control token, so nobody can forge turns. Only the chat template's own markup yields control
tokens. (``plain_content=False`` restores the old behaviour for trusted callers.)
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2Tokenizer
from transformers.utils import logging as hf_logging

# Names of end-of-turn tokens used by the families we serve (LLaDA/Llama-3, Qwen, LLaDA2/Ling).
END_OF_TURN_NAMES = ("<|eot_id|>", "<|im_end|>", "<|role_end|>")
# Tokenizer classes a checkpoint ships as remote code that are Qwen2's byte-level BPE (vocab.json +
# merges.txt, Qwen2's pre-tokenization regex) under another name: Dream's tokenization_dream.py.
QWEN2_EQUIVALENT_CLASSES = ("DreamTokenizer",)
# Padding tokens a diffusion model writes after its answer (DiffuCoder's <|dlm_pad|>): they end it too.
DIFFUSION_PAD_NAMES = ("<|dlm_pad|>",)


@dataclass
class RenderedChat:
    """A chat template's output in which each special-token string that came from message content
    is replaced by a marker; ``literals`` maps each marker back to its text (tokenized as text)."""

    text: str
    literals: dict[str, str]
    marker: re.Pattern[str] | None

    def plain(self) -> str:
        """The text exactly as the template rendered it."""
        if self.marker is None:
            return self.text
        return self.marker.sub(lambda m: self.literals[m.group(0)], self.text)


def _tokenizer_class(path: Path) -> str | None:
    """``tokenizer_class`` from tokenizer_config.json, if the file says."""
    try:
        return json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


class ChatTokenizer:
    """Wraps a Hugging Face fast tokenizer loaded from local files (no remote code)."""

    def __init__(self, path: str | Path) -> None:
        # transformers warns that it does not know the model type (llada); we only want the tokenizer.
        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            qwen2 = _tokenizer_class(Path(path)) in QWEN2_EQUIVALENT_CLASSES
            loader = Qwen2Tokenizer if qwen2 else AutoTokenizer
            with warnings.catch_warnings():  # config.json's rope_scaling key (Dream's) draws a FutureWarning
                warnings.simplefilter("ignore", FutureWarning)
                self.hf: PreTrainedTokenizerBase = loader.from_pretrained(str(path), trust_remote_code=False)
        finally:
            hf_logging.set_verbosity(previous)
        vocab = self.hf.get_vocab()
        self.end_of_turn_id: int | None = next((vocab[n] for n in END_OF_TURN_NAMES if n in vocab), None)
        self.diffusion_pad_ids = tuple(vocab[n] for n in DIFFUSION_PAD_NAMES if n in vocab)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Tokens of raw text; no special tokens are added (prompts carry their own)."""
        return self.hf.encode(text, add_special_tokens=False)

    def encode_plain(self, text: str) -> list[int]:
        """Tokens of text in which special-token strings are ordinary characters."""
        return self.hf.encode(text, add_special_tokens=False, split_special_tokens=True)

    @functools.cached_property
    def _special_strings(self) -> re.Pattern[str] | None:
        specials = sorted(
            {t.content for t in self.hf.added_tokens_decoder.values() if t.special and t.content},
            key=len,
            reverse=True,
        )
        return re.compile("|".join(map(re.escape, specials))) if specials else None

    def render_chat_text(
        self,
        messages: list[dict[str, Any]],
        plain_content: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> RenderedChat:
        """The conversation through the chat template, generation prompt appended, not yet tokenized.
        ``tools`` goes to a template that has a tool section (server/tools.py)."""
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
        literals: dict[str, str] = {}
        marker = None
        if plain_content and self._special_strings is not None:
            nonce = secrets.token_hex(8)  # content cannot contain a marker it cannot guess
            marker = re.compile(f"\ue000{nonce}\\d+\ue001")

            def mark(m: re.Match[str]) -> str:
                key = f"\ue000{nonce}{len(literals)}\ue001"
                literals[key] = m.group(0)
                return key

            messages = [{**m, "content": self._special_strings.sub(mark, m["content"])} for m in messages]
        # tokenize=False: the rendered text (transformers' annotation covers every mode).
        text = cast(
            str,
            self.hf.apply_chat_template(
                messages, tools=cast(Any, tools or None), tokenize=False, add_generation_prompt=True
            ),
        )
        return RenderedChat(text, literals, marker if literals else None)

    def encode_chat(self, rendered: RenderedChat) -> list[int]:
        """Tokens of a rendered chat: the template's markup may be special, the content's literals not."""
        if rendered.marker is None:
            return self.encode(rendered.text)
        ids: list[int] = []
        start = 0
        for m in rendered.marker.finditer(rendered.text):
            ids += self.encode(rendered.text[start : m.start()])
            ids += self.encode_plain(rendered.literals[m.group(0)])
            start = m.end()
        return ids + self.encode(rendered.text[start:])

    def render_chat(self, messages: list[dict[str, Any]], plain_content: bool = True) -> list[int]:
        """Token ids of the conversation with the generation prompt appended."""
        return self.encode_chat(self.render_chat_text(messages, plain_content))

    @functools.cached_property
    def max_chars_per_token(self) -> int | None:
        """No token covers more characters than this (None: no such bound is known).

        For BPE each token is a vocabulary entry, whose string is at least as long as the text it
        covers (byte-level entries have one character per byte). A BPE that fuses unknown
        characters into one token, and other models (WordPiece's [UNK] covers a whole word), have
        no bound.
        """
        backend = getattr(self.hf, "backend_tokenizer", None)
        model = getattr(backend, "model", None)
        if not isinstance(model, BPE) or (model.unk_token is not None and model.fuse_unk):
            return None
        return max(len(t) for t in self.hf.get_vocab())

    def min_tokens(self, text: str) -> int:
        """A lower bound on the number of tokens ``text`` encodes to, found without tokenizing it."""
        limit = self.max_chars_per_token
        if limit is None:
            return 0
        normalizer = self.hf.backend_tokenizer.normalizer
        chars = len(normalizer.normalize_str(text)) if normalizer is not None else len(text)
        return -(-chars // limit)

    def decode(self, ids: list[int]) -> str:
        text = self.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return cast(str, text)  # one sequence of ids: one string

    def stop_ids(self, eos_token_id: int) -> tuple[int, ...]:
        """config.json's eos plus the tokenizer's own eos, end-of-turn and a diffusion padding token,
        when the vocabulary has them: published loops stop at ``tokenizer.eos_token_id``, which need not
        be config.json's (Nemotron-Labs-Diffusion: config 11, answers also end at ``</s>``)."""
        ids = [eos_token_id, self.hf.eos_token_id, self.end_of_turn_id, *self.diffusion_pad_ids]
        return tuple(dict.fromkeys(i for i in ids if i is not None))
