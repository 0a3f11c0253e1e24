"""Refusing prompts that cannot fit the context before they are tokenized.

Tokenizing a multi-megabyte prompt takes seconds and hundreds of megabytes, only to find it is
far over the context. ``ChatTokenizer.min_tokens`` bounds the token count from the character count
(no token covers more characters than the longest vocabulary entry), so a prompt whose lower bound
plus ``max_tokens`` exceeds the context is refused at once. The bound never overestimates, so a
prompt that fits is never refused here; the exact check after tokenization stays in the routes.
"""

from __future__ import annotations

from dllm_serve.protocol import DEFAULT_MAX_TOKENS
from dllm_serve.server.errors import bad_request


def check_fits(state, min_prompt_tokens: int, req, param: str) -> None:
    """400 ``context_length_exceeded`` when even ``min_prompt_tokens`` leaves no room for the answer."""
    max_tokens = req.requested_max_tokens or DEFAULT_MAX_TOKENS
    max_len = state.max_model_len
    if min_prompt_tokens + max_tokens > max_len:
        raise bad_request(
            f"This model's maximum context length is {max_len} tokens. However, the prompt is at least "
            f"{min_prompt_tokens} tokens long (from its length in characters) and {max_tokens} tokens "
            "are requested for the completion. Please reduce the prompt or max_tokens.",
            param,
            "context_length_exceeded",
        )
