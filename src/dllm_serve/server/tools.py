"""Tool calls: rendering tools and tool turns into the prompt, and parsing calls out of the output.

The call format is one line per call, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
(the tags Qwen-family chat templates use). A chat template with a tool section (it reads the
``tools`` variable) renders the tools and tool turns itself; otherwise (the bundled tiny models,
LLaDA) the generic rendering below is used: a system message listing the tools as JSON and saying
how to call them, assistant turns' calls written in the call format, and tool results as user turns
wrapped in ``<tool_response>``. See docs/structured-output.md.

``tool_choice`` ``required`` or a named function is enforced: the output is constrained to calls
whose arguments validate against the function's parameters (``forced_calls``), so the call always
parses. ``auto`` leaves the model free and parses whatever calls it writes; ``none`` renders no tools.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from dllm_serve.protocol import ChatMessage

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NO_PARAMETERS = {"type": "object", "properties": {}}


def active(req: Any) -> bool:
    """Whether the request offers tools the model may call."""
    return bool(getattr(req, "tools", None)) and getattr(req, "tool_choice", None) != "none"


def _offered(req: Any) -> list[Any]:
    choice = req.tool_choice
    if choice is not None and not isinstance(choice, str):
        return [t for t in req.tools if t.function.name == choice.function.name]
    return list(req.tools)


def forced_calls(req: Any) -> str | None:
    """The grammar (llguidance Lark) of the output when a call is required, else None."""
    if not active(req) or req.tool_choice in (None, "auto"):
        return None
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or _NO_PARAMETERS,
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in _offered(req)
    ]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
    many = req.parallel_tool_calls is not False and req.tool_choice == "required"
    start = 'start: call ("\\n" call)*' if many else "start: call"
    return f'{start}\ncall: "{OPEN}" %json {json.dumps(schema)} "{CLOSE}"\n'


def _call_text(name: str, arguments: str) -> str:
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError:
        args = arguments
    return OPEN + json.dumps({"name": name, "arguments": args}) + CLOSE


def native(tokenizer: Any) -> bool:
    """Whether the checkpoint's chat template renders tools itself."""
    return "tools" in (getattr(tokenizer.hf, "chat_template", None) or "")


def template_messages(req: Any, tokenizer: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The conversation for the chat template, and the tools to pass it (native templates only)."""
    messages: list[ChatMessage] = req.messages
    offer = active(req)
    if native(tokenizer):
        out = []
        for m in messages:
            d: dict[str, Any] = m.template_dict()
            if m.tool_calls:
                d["tool_calls"] = [
                    {"type": "function", "function": {"name": c.function.name, "arguments": _args(c)}}
                    for c in m.tool_calls
                ]
            if m.role == "tool" and m.tool_call_id:
                d["tool_call_id"] = m.tool_call_id
            out.append(d)
        tools = [t.model_dump(exclude_none=True) for t in _offered(req)] if offer else None
        return out, tools
    out = []
    for m in messages:
        d = m.template_dict()
        if m.tool_calls:
            calls = "\n".join(_call_text(c.function.name, c.function.arguments) for c in m.tool_calls)
            d["content"] = (d["content"] + "\n" if d["content"] else "") + calls
        if m.role == "tool":
            d = {"role": "user", "content": f"<tool_response>\n{d['content']}\n</tool_response>"}
        out.append(d)
    if offer:
        prompt = generic_prompt(_offered(req))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _args(call: Any) -> Any:
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments


def generic_prompt(offered: list[Any]) -> str:
    """The generic tool section: the functions as JSON, one per line, and the call format."""
    lines = "\n".join(
        json.dumps(t.function.model_dump(exclude_none=True), separators=(",", ":")) for t in offered
    )
    return (
        f"You may call these functions:\n<tools>\n{lines}\n</tools>\n"
        f'To call them, reply with one line per call: {OPEN}{{"name":...,"arguments":{{...}}}}{CLOSE}'
    )


def _new_call(text: str) -> dict[str, Any] | None:
    """An OpenAI tool call from the JSON between the tags, or None if it is not a call."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        return None
    args = body.get("arguments", body.get("parameters", {}))
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": body["name"], "arguments": args if isinstance(args, str) else json.dumps(args)},
    }


def parse(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a finished output; content None when only calls were written."""
    stream = CallStream()
    parts = stream.feed(text) + stream.finish()
    content = "".join(p for p in parts if isinstance(p, str))
    calls = [p for p in parts if isinstance(p, dict)]
    return (content if content.strip() or not calls else None), calls


class CallStream:
    """Splits streamed text into content and complete tool calls, holding back text that may still
    become a call (a partial ``<tool_call>`` tag or an unfinished call)."""

    def __init__(self) -> None:
        self.buffer = ""
        self.calls = 0
        self.blank = ""  # white space after a call, sent only if more content follows

    def feed(self, text: str) -> list[str | dict[str, Any]]:
        self.buffer += text
        out: list[str | dict[str, Any]] = []
        while True:
            start = self.buffer.find(OPEN)
            if start < 0:
                keep = _partial_tag(self.buffer)
                self._content(out, self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep :]
                return out
            end = self.buffer.find(CLOSE, start)
            if end < 0:
                self._content(out, self.buffer[:start])
                self.buffer = self.buffer[start:]
                return out
            call = _new_call(self.buffer[start + len(OPEN) : end])
            self._content(out, self.buffer[:start])
            if call is None:  # not a call after all: the text is content
                self._content(out, self.buffer[start : end + len(CLOSE)])
            else:
                out.append(call)
                self.calls += 1
            self.buffer = self.buffer[end + len(CLOSE) :]

    def finish(self) -> list[str | dict[str, Any]]:
        out: list[str | dict[str, Any]] = []
        self._content(out, self.buffer)
        self.buffer = self.blank = ""
        return out

    def _content(self, out: list[str | dict[str, Any]], text: str) -> None:
        if self.calls and not text.strip():  # the newline between calls is not content
            self.blank += text
        elif text:
            out.append(self.blank + text)
            self.blank = ""


def with_calls(choice: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed chat choice with the calls in its text as ``tool_calls`` (content None when
    the text is only calls) and ``finish_reason`` ``tool_calls`` when it stopped after calls."""
    message = choice["message"]
    content, calls = parse(message["content"])
    if not calls:
        return choice
    finish = "tool_calls" if choice["finish_reason"] == "stop" else choice["finish_reason"]
    message = {**message, "content": content, "tool_calls": calls}
    return {**choice, "message": message, "finish_reason": finish}


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of ``text`` that starts ``<tool_call>``."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


class ChatDeltas:
    """The chat stream's delta builder for a request with tools: content streams as it commits,
    each tool call goes out whole once its closing tag has committed (``index``, ``id``, ``type``,
    ``function.name`` and ``function.arguments`` in one delta, as OpenAI clients accumulate)."""

    def __init__(self) -> None:
        self.streams: dict[int, CallStream] = {}

    def __call__(
        self, index: int, text: str | None, finish: str | None, first: bool = False, logprobs: Any = None
    ) -> dict[str, Any]:
        if first:
            return {
                "index": index,
                "delta": {"role": "assistant", "content": "", "refusal": None},
                "logprobs": None,
                "finish_reason": None,
            }
        stream = self.streams.setdefault(index, CallStream())
        parts = stream.feed(text) if text is not None else []
        if finish is not None:
            parts += stream.finish()
        delta: dict[str, Any] = {}
        content = "".join(p for p in parts if isinstance(p, str))
        if content:
            delta["content"] = content
        calls = [p for p in parts if isinstance(p, dict)]
        if calls:
            base = stream.calls - len(calls)
            delta["tool_calls"] = [{"index": base + k, **c} for k, c in enumerate(calls)]
        if finish == "stop" and stream.calls:
            finish = "tool_calls"
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
