"""The checkpoint's own tokenizer and chat template, and the stop tokens derived from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

# Names of end-of-turn tokens used by the families we serve (LLaDA/Llama-3, Qwen).
END_OF_TURN_NAMES = ("<|eot_id|>", "<|im_end|>")


class ChatTokenizer:
    """Wraps a Hugging Face fast tokenizer loaded from local files (no remote code)."""

    def __init__(self, path: str | Path) -> None:
        # transformers warns that it does not know the model type (llada); we only want the tokenizer.
        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.hf: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
                str(path), trust_remote_code=False
            )
        finally:
            hf_logging.set_verbosity(previous)
        vocab = self.hf.get_vocab()
        self.end_of_turn_id: int | None = next((vocab[n] for n in END_OF_TURN_NAMES if n in vocab), None)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Tokens of raw text; no special tokens are added (prompts carry their own)."""
        return self.hf.encode(text, add_special_tokens=False)

    def render_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of the conversation with the generation prompt appended."""
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def stop_ids(self, eos_token_id: int) -> tuple[int, ...]:
        """eos plus end-of-turn, when the vocabulary has one."""
        ids = [eos_token_id]
        if self.end_of_turn_id is not None and self.end_of_turn_id != eos_token_id:
            ids.append(self.end_of_turn_id)
        return tuple(ids)
