"""The ``POST /v1/responses`` request, read into the chat path's terms.

The Responses API spells the chat fields differently; each maps onto what the chat path reads
(``preparation.chat_prompt``, ``structured.compile_constraint``, ``tools``):

- ``instructions``: a leading system message; ``input`` (a string, or items): ``messages``;
- a ``message`` item (``role``, ``content`` a string or text parts): that message;
- ``function_call`` items (``call_id``, ``name``, ``arguments``): the ``tool_calls`` of the
  assistant turn, merged into the assistant message just before them (an earlier answer's output
  is ``[message, function_call, ...]``, one chat turn);
- a ``function_call_output`` item (``call_id``, ``output``): a ``tool`` message answering it;
- ``max_output_tokens``: ``max_tokens``;
- ``text.format`` ``{"type": "json_schema", "name", "schema", "strict", "description"}`` (flat):
  ``response_format`` ``{"type": "json_schema", "json_schema": {...}}``; ``{"type":
  "json_object"}`` and ``{"type": "text"}``: ``response_format`` of that type;
- ``tools`` ``[{"type": "function", "name", "description", "parameters", "strict"}]`` (flat):
  chat's ``[{"type": "function", "function": {...}}]``; ``tool_choice`` ``none`` / ``auto`` /
  ``required`` as they are, ``{"type": "function", "name"}`` as chat's named choice;
  ``parallel_tool_calls`` as it is.

The mapped fields are exposed under the chat names (``messages``, ``response_format``, ``tools``,
``tool_choice``), so the chat path's code runs unchanged. Fields this server cannot honour are a
400 naming them (``_NOTHING``), as are non-function tools (``web_search``, ``file_search`` ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from dllm_serve.protocol import (
    ChatMessage,
    DiffusionFields,
    FunctionSpec,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    check_tool_choice,
    one_algorithm,
)
from dllm_serve.server.errors import APIError

# Responses API fields this server does not implement, with the values that ask for nothing (the
# fields chat shares, such as store or metadata, are refused by ``protocol.strip_unsupported``).
_NOTHING: dict[str, Callable[[Any], bool]] = {
    "max_tool_calls": lambda v: v is None,
    "previous_response_id": lambda v: v is None,
    "conversation": lambda v: v is None,
    "prompt": lambda v: v is None,
    "reasoning": lambda v: v is None or (isinstance(v, dict) and all(x is None for x in v.values())),
    "include": lambda v: v is None or v == [],
    "background": lambda v: v is None or v is False,
    "truncation": lambda v: v in (None, "disabled"),
    "stream_options": lambda v: v is None,
}
_TEXT_PARTS = ("input_text", "output_text", "text")
_CHOICES = ("none", "auto", "required")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextFormat(_Body):
    """``text.format``: plain text, any JSON object, or a JSON schema (its fields flat, not nested
    under ``json_schema`` as in chat's ``response_format``)."""

    type: Literal["text", "json_object", "json_schema"]
    name: str = Field("response", pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _known(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"type {kind!r} is not supported: use 'text', 'json_object' or 'json_schema'")
        if kind == "json_schema" and not isinstance(value.get("schema"), dict):
            raise ValueError("type 'json_schema' needs a 'schema' object")
        return value

    def echo(self) -> dict[str, Any]:
        """The format as the response object shows it."""
        if self.type != "json_schema":
            return {"type": self.type}
        return {
            "type": "json_schema",
            "name": self.name,
            "schema": self.schema_,
            "strict": self.strict,
            "description": self.description,
        }


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # OpenAI's default; other values ask for a style


class FunctionTool(_Body):
    """A function the model may call: OpenAI's Responses shape (flat, no ``function`` wrapper)."""

    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def chat_tool(self) -> Tool:
        spec = FunctionSpec(
            name=self.name, description=self.description, parameters=self.parameters, strict=self.strict
        )
        return Tool(type="function", function=spec)

    def echo(self) -> dict[str, Any]:
        return self.model_dump()


class ResponsesRequest(DiffusionFields):  # type: ignore[misc, valid-type]
    """The supported subset of a Responses API request (unsupported fields are refused first)."""

    model: str
    input: Any
    instructions: str | None = None
    max_output_tokens: int | None = None
    stream: bool | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    algorithm: str | None = None
    generation_algorithm: str | None = None
    text: TextConfig | None = None
    function_tools: list[FunctionTool] | None = Field(None, alias="tools")
    choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(None, alias="tool_choice")
    parallel_tool_calls: bool | None = None
    # The denoise view streams chat/completions chunks; Responses events carry committed text only.
    stream_mode: Literal["committed"] = "committed"

    @property
    def requested_logprobs(self) -> None:
        """Token log-probabilities are offered on chat and completions, not here."""
        return None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> ResponsesRequest:
        """Fields of the Responses API this server cannot honour are a 400 naming them, first."""
        return super().model_validate(_refuse_unsupported(obj), **kwargs)

    @field_validator("input")
    @classmethod
    def _input(cls, value: Any) -> list[ChatMessage]:
        if isinstance(value, str):
            return [ChatMessage(role="user", content=value)]
        if not isinstance(value, list) or not value:
            raise ValueError("input must be a non-empty string or a non-empty list of input items")
        return _conversation(value)

    @field_validator("max_output_tokens")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be a positive integer")
        return value

    @field_validator("function_tools", mode="before")
    @classmethod
    def _functions_only(cls, value: Any) -> Any:
        for i, tool in enumerate(value if isinstance(value, list) else []):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind == "function" and "function" in tool:
                raise ValueError(
                    f"tools[{i}] has chat's shape; here a function's fields are flat: "
                    "{'type': 'function', 'name': ..., 'parameters': ...}"
                )
            if kind != "function":
                raise ValueError(
                    f"tools[{i}] has type {kind!r}: only function tools are supported by this server"
                )
        return value

    @field_validator("choice", mode="before")
    @classmethod
    def _choice_shape(cls, value: Any) -> Any:
        """The Responses shape: a mode string or ``{"type": "function", "name": ...}``."""
        if value is None or value in _CHOICES:
            return value
        named = isinstance(value, dict) and value.get("type") == "function" and set(value) == {"type", "name"}
        if not named or not isinstance(value["name"], str):
            raise ValueError(
                "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...} "
                "(other tool types are not supported by this server)"
            )
        return NamedToolChoice(type="function", function=NamedFunction(name=value["name"]))

    @field_validator("choice")
    @classmethod
    def _known_tool(cls, value: Any, info: ValidationInfo) -> Any:
        return check_tool_choice(value, {t.name for t in info.data.get("function_tools") or []})

    _one_algorithm = field_validator("generation_algorithm")(one_algorithm)

    # What the chat path (preparation.chat_prompt, prepare_generation, structured, tools) reads.
    n: ClassVar[int] = 1
    stop: ClassVar[list[str]] = []

    @property
    def messages(self) -> list[ChatMessage]:
        system = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        return system + self.input

    @property
    def response_format(self) -> ResponseFormat | None:
        fmt = self.text.format if self.text is not None else None
        if fmt is None:
            return None
        if fmt.type != "json_schema":
            return ResponseFormat(type=fmt.type)
        spec = {"name": fmt.name, "description": fmt.description, "schema": fmt.schema_, "strict": fmt.strict}
        return ResponseFormat.model_validate({"type": "json_schema", "json_schema": spec})

    @property
    def tools(self) -> list[Tool] | None:
        return None if self.function_tools is None else [t.chat_tool() for t in self.function_tools]

    @property
    def tool_choice(self) -> str | NamedToolChoice | None:
        return self.choice

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_output_tokens

    @property
    def algorithm_name(self) -> str | None:
        return self.algorithm or self.generation_algorithm

    # What the response object echoes (OpenAI's defaults where the request left a field out).

    def echo_text(self) -> dict[str, Any]:
        fmt = self.text.format if self.text is not None else None
        return {"format": fmt.echo() if fmt is not None else {"type": "text"}}

    def echo_tools(self) -> list[dict[str, Any]]:
        return [t.echo() for t in self.function_tools or []]

    def echo_tool_choice(self) -> str | dict[str, str]:
        if isinstance(self.choice, NamedToolChoice):
            return {"type": "function", "name": self.choice.function.name}
        return self.choice or "auto"


def _conversation(items: list[Any]) -> list[ChatMessage]:
    """Input items as chat messages; ``function_call`` items join the assistant turn before them
    (a previous response's output is ``[message, function_call, ...]``: one chat assistant turn)."""
    turns: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be an input item object")
        item = {k: v for k, v in item.items() if v is not None}  # a null field asks for nothing
        kind = item.get("type", "message")
        if kind == "message":
            turns.append(_message(where, item))
        elif kind == "function_call":
            call = _function_call(where, item)
            last = turns[-1] if turns else None
            if last is not None and last["role"] == "assistant":
                last["tool_calls"] = [*last.get("tool_calls", []), call]
            else:
                turns.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            _only(where, item, {"type", "call_id", "output", "id", "status"})
            turns.append(
                {
                    "role": "tool",
                    "tool_call_id": _string(where, item, "call_id"),
                    "content": _text(f"{where}.output", item.get("output")),
                }
            )
        else:
            raise ValueError(
                f"{where}.type {kind!r} is not supported "
                "(only 'message', 'function_call' and 'function_call_output' items)"
            )
    return [ChatMessage.model_validate(t) for t in turns]


def _message(where: str, item: dict[str, Any]) -> dict[str, Any]:
    """A message item whose content is a string or text parts (nothing else)."""
    _only(where, item, {"type", "role", "content", "id", "status", "phase"})
    role = item.get("role")
    if role not in ("system", "developer", "user", "assistant"):
        raise ValueError(f"{where}.role must be one of system, developer, user, assistant")
    return {"role": role, "content": _text(f"{where}.content", item.get("content"))}


def _function_call(where: str, item: dict[str, Any]) -> dict[str, Any]:
    """A ``function_call`` item (an earlier answer's call) as a chat tool call."""
    _only(where, item, {"type", "call_id", "name", "arguments", "id", "status"})
    name, arguments = _string(where, item, "name"), _string(where, item, "arguments")
    function = {"name": name, "arguments": arguments}
    return {"id": _string(where, item, "call_id"), "type": "function", "function": function}


def _text(where: str, content: Any) -> str:
    """A string, or text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where} must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}[{j}]: only text parts are supported, got {kind!r}")
        texts.append(part["text"])
    return "".join(texts)


def _string(where: str, item: dict[str, Any], key: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}.{key} must be a non-empty string")
    return value


def _only(where: str, item: dict[str, Any], known: set[str]) -> None:
    unknown = set(item) - known
    if unknown:
        raise ValueError(f"{where} has unsupported fields: {sorted(unknown)}")


def _refuse_unsupported(body: dict[str, Any]) -> dict[str, Any]:
    for key, asks_nothing in _NOTHING.items():
        if key in body and not asks_nothing(body[key]):
            raise APIError(
                400, f"'{key}' is not supported by this server", param=key, code="unsupported_parameter"
            )
    return {k: v for k, v in body.items() if k not in _NOTHING}
