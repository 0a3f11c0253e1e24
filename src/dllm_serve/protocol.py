"""OpenAI request schemas plus the diffusion extension fields (responses: ``protocol_responses.py``).

Requests are validated strictly (no string-to-number coercion, no unknown fields) so a client's
mistake is a 400 naming the field instead of a silently different generation. OpenAI fields this
server cannot honour are refused by name (``unsupported_field``) unless their value asks for
nothing (``logprobs: false``, ``presence_penalty: 0`` ...), which clients often send by default.

The diffusion fields are exactly the request-overridable fields of ``DecodeParams``
(``algorithms.OVERRIDABLE``, its knobs), generated from that dataclass, descriptions included, so
the two cannot drift apart, plus
``algorithm`` and its alias ``generation_algorithm``.

Structured output (``response_format``, the ``guided_*`` extension fields) and tools are parsed
here and compiled into a grammar by ``server/structured.py`` (docs/structured-output.md).
"""

from __future__ import annotations

import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator

from dllm_serve.engine.algorithms import KNOBS, OVERRIDABLE, DecodeParams

DEFAULT_MAX_TOKENS = 128  # a request without max_tokens / max_completion_tokens generates at most this
MAX_N = 64
MAX_STOP_STRINGS = 4  # OpenAI's limit
# Integers are 64-bit downstream (torch seeds, tensor sizes): larger ones are a 400 naming the field.
# A seed leaves room for seed + choice index (see routes) below 2**64, which torch still accepts.
MAX_INT = 2**63 - 1
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat's top_logprobs; used for completions' logprobs too

# OpenAI fields this server does not implement, with the values that request nothing.
_HARMLESS: dict[str, typing.Callable[[Any], bool]] = {
    "logit_bias": lambda v: v is None or v == {},
    "presence_penalty": lambda v: v is None or v == 0,
    "frequency_penalty": lambda v: v is None or v == 0,
    "repetition_penalty": lambda v: v is None or v == 1,
    "functions": lambda v: v is None or v == [],
    "function_call": lambda v: v is None or v == "none",
    "best_of": lambda v: v is None or v == 1,
    "suffix": lambda v: v is None or v == "",
    "audio": lambda v: v is None,
    "modalities": lambda v: v is None or v == ["text"],
    "prediction": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "store": lambda v: v is None or v is False,
    "metadata": lambda v: v is None,
    "service_tier": lambda v: v is None or v in ("auto", "default"),
}


class UnsupportedFieldError(ValueError):
    """An OpenAI field the server cannot honour (400 naming it)."""

    def __init__(self, param: str) -> None:
        super().__init__(f"'{param}' is not supported by this server")
        self.param = param


def strip_unsupported(body: dict[str, Any]) -> dict[str, Any]:
    """Drop unsupported OpenAI fields whose value asks for nothing; raise for any that asks for something."""
    out = {}
    for key, value in body.items():
        harmless = _HARMLESS.get(key)
        if harmless is None:
            out[key] = value
        elif not harmless(value):
            raise UnsupportedFieldError(key)
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*")
    @classmethod
    def _int64(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value > MAX_INT:
                raise ValueError(f"{info.field_name} must be at most {MAX_INT} (a 64-bit integer)")
            if value < -MAX_INT - 1:
                raise ValueError(f"{info.field_name} must be at least {-MAX_INT - 1} (a 64-bit integer)")
        return value


def _diffusion_fields() -> dict[str, Any]:
    hints = typing.get_type_hints(DecodeParams)
    return {name: (hints[name] | None, Field(None, description=KNOBS[name].help)) for name in OVERRIDABLE}


class _Decoding(_Strict):
    """What every request with the diffusion fields answers about them."""

    def decode_overrides(self) -> dict[str, Any]:
        """The DecodeParams overrides this request sets (None: the preset's default)."""
        return {name: getattr(self, name) for name in OVERRIDABLE if getattr(self, name) is not None}


# One optional field per DecodeParams override (steps, block_length, threshold, temperature, seed ...).
DiffusionFields: type[BaseModel] = create_model("DiffusionFields", __base__=_Decoding, **_diffusion_fields())


class StreamOptions(_Strict):
    include_usage: bool | None = None


def one_algorithm(cls: type, value: str | None, info: ValidationInfo) -> str | None:
    """Validator for ``generation_algorithm`` (the alias some clients send): it may not disagree
    with ``algorithm``. Shared by every request model that takes both."""
    other = info.data.get("algorithm")
    if value and other and value != other:
        raise ValueError("algorithm and generation_algorithm disagree; send one of them")
    return value


class JsonSchemaFormat(_Strict):
    """``response_format.json_schema``: the schema the output must validate against."""

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``: text (no constraint), any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(default=None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, value: JsonSchemaFormat | None, info: ValidationInfo) -> JsonSchemaFormat | None:
        if info.data.get("type") == "json_schema" and (value is None or value.schema_ is None):
            raise ValueError("type 'json_schema' needs json_schema.schema")
        return value


class _GenerationRequest(DiffusionFields):  # type: ignore[misc, valid-type]
    """Fields shared by /v1/chat/completions and /v1/completions.

    ``null`` for an optional field means its default (``"n": null`` is ``n`` 1), as in OpenAI's API.
    """

    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: Any = Field(default=None, validate_default=True)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stream_mode: Literal["committed", "denoise"] = "committed"
    user: str | None = None
    algorithm: str | None = None
    generation_algorithm: str | None = None
    # Constraints (one at a time): OpenAI's response_format, or vLLM's guided_* extension fields.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None

    @field_validator("guided_choice")
    @classmethod
    def _choices(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or any(c == "" for c in value)):
            raise ValueError("guided_choice must be a non-empty list of non-empty strings")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError("stop must be a string or a list of strings")
        if len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings")
        if any(s == "" for s in items):
            raise ValueError("stop strings must not be empty")
        return items

    @field_validator("n", "stream", mode="wrap")
    @classmethod
    def _null_is_default(cls, value: Any, handler: Any, info: ValidationInfo) -> Any:
        if value is None:
            return cls.model_fields[info.field_name].default
        return handler(value)

    @field_validator("n")
    @classmethod
    def _n(cls, value: int) -> int:
        if not 1 <= value <= MAX_N:
            raise ValueError(f"n must be between 1 and {MAX_N}")
        return value

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be a positive integer")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("stream_mode")
    @classmethod
    def _denoise_streams(cls, value: str, info: ValidationInfo) -> str:
        if value == "denoise" and not info.data.get("stream"):
            raise ValueError("stream_mode 'denoise' needs stream: true")
        return value

    _one_algorithm = field_validator("generation_algorithm")(one_algorithm)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def algorithm_name(self) -> str | None:
        return self.algorithm or self.generation_algorithm

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class FunctionSpec(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None  # accepted for compatibility; chat templates here do not use it
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> str:
        """Plain text: a string, or an array of text parts joined (other part types are refused)."""
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or an array of text parts")
        texts = []
        for part in value:
            is_text = isinstance(part, dict) and part.get("type") == "text"
            if not is_text or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
            if set(part) - {"type", "text"}:
                raise ValueError(f"unknown content part fields: {sorted(set(part) - {'type', 'text'})}")
            texts.append(part["text"])
        return "".join(texts)

    @field_validator("tool_calls")
    @classmethod
    def _from_assistant(cls, value: list[ToolCall] | None, info: ValidationInfo) -> list[ToolCall] | None:
        if value and info.data.get("role") != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return value

    def template_dict(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.content}


def check_tool_choice(value: Any, names: set[str]) -> Any:
    """A named choice must name one of the request's functions, and "required" needs some."""
    if isinstance(value, NamedToolChoice) and value.function.name not in names:
        raise ValueError(f"tool_choice names the function {value.function.name!r}, which is not in tools")
    if value == "required" and not names:
        raise ValueError("tool_choice 'required' needs tools")
    return value


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("tool_choice")
    @classmethod
    def _known_tool(cls, value: Any, info: ValidationInfo) -> Any:
        return check_tool_choice(value, {t.function.name for t in info.data.get("tools") or []})

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return value
        if not 0 <= value <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        if not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def requested_logprobs(self) -> int | None:
        """None, or the top alternatives wanted with each token's log-probability."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("messages must contain at least one message")
        return value


class CompletionRequest(_GenerationRequest):
    prompt: Any
    echo: bool = False
    logprobs: int | None = None  # top alternatives per token; 0: the chosen tokens' only

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        """0 is allowed here (with echo: score the prompt, generate nothing); the route checks echo."""
        if value is not None and value < 0:
            raise ValueError("must be a non-negative integer")
        return value

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        return value

    @property
    def requested_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> list[str | list[int]]:
        """Normalised to a list of prompts, each text or token ids (OpenAI's four prompt forms)."""
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value:
            if all(isinstance(p, str) for p in value):
                return list(value)
            if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
                return [list(value)]
            if all(
                isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                for p in value
            ):
                return [list(p) for p in value]
        raise ValueError(
            "prompt must be a non-empty string, a list of strings, a list of token ids "
            "or a list of such lists"
        )
