"""Tool calls without a server: the generic and native renderings, parsing, and the stream splitter."""

from __future__ import annotations

import json
import shutil

import pytest

from dllm_serve.models.tokenizer import ChatTokenizer
from dllm_serve.protocol import ChatCompletionRequest
from dllm_serve.server import tools
from tests.helpers import TINY_LLADA

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
]


def _req(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": HISTORY, "tools": [WEATHER], **kw})


def test_generic_rendering_of_tools_and_tool_turns():
    tok = ChatTokenizer(TINY_LLADA)
    messages, specs = tools.template_messages(_req(), tok)
    assert specs is None  # the tiny template has no tool section
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.")
    assert '"name":"get_weather"' in messages[0]["content"] and tools.OPEN in messages[0]["content"]
    assert messages[2] == {
        "role": "assistant",
        "content": '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    }
    assert messages[3] == {"role": "user", "content": "<tool_response>\n21 C\n</tool_response>"}
    assert "get_weather" in tok.render_chat_text(messages).plain()
    none, _ = tools.template_messages(_req(tool_choice="none"), tok)
    assert none[0]["content"] == "Be brief."  # tool_choice none: no tools rendered


def test_native_template_gets_tools_and_hf_messages(tmp_path):
    """A template with a tool section renders tools itself, from Hugging Face's message format."""
    model = tmp_path / "m"
    shutil.copytree(TINY_LLADA, model, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{% for t in tools or [] %}TOOL {{ t.function.name }}\n{% endfor %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}"
        "{% for c in m.tool_calls or [] %} CALL {{ c.function.name }}({{ c.function.arguments.city }})"
        "{% endfor %}\n"
        "{% endfor %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = ChatTokenizer(model)
    messages, specs = tools.template_messages(_req(), tok)
    text = tok.render_chat_text(messages, tools=specs).plain()
    assert "TOOL get_weather" in text and "CALL get_weather(Paris)" in text and "tool: 21 C" in text


def test_parse_calls_and_content():
    text = 'Sure.\n<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>\n'
    text += '<tool_call>{"name": "g"}</tool_call>'
    content, calls = tools.parse(text)
    assert content == "Sure.\n"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("f", {"a": 1}),
        ("g", {}),
    ]
    assert tools.parse("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert tools.parse("plain") == ("plain", [])


@pytest.mark.parametrize("cut", [1, 3, 7, 12, 25])
def test_stream_holds_back_partial_calls(cut):
    text = 'Hi <tool_call>{"name": "f", "arguments": {}}</tool_call> bye <tool'
    deltas = tools.ChatDeltas()
    pieces = [text[i : i + cut] for i in range(0, len(text), cut)]
    out = [deltas(0, p, None)["delta"] for p in pieces] + [deltas(0, None, "stop")]
    content = "".join(d.get("content", "") for d in out[:-1]) + out[-1]["delta"].get("content", "")
    calls = [c for d in out[:-1] for c in d.get("tool_calls", [])] + out[-1]["delta"].get("tool_calls", [])
    assert content == "Hi  bye <tool"
    assert [c["function"]["name"] for c in calls] == ["f"] and calls[0]["index"] == 0
    assert out[-1]["finish_reason"] == "tool_calls"


def test_forced_grammar_follows_tool_choice():
    assert tools.forced_calls(_req()) is None  # auto
    required = tools.forced_calls(_req(tool_choice="required"))
    assert 'call ("\\n" call)*' in required and "get_weather" in required
    single = tools.forced_calls(_req(tool_choice="required", parallel_tool_calls=False))
    assert single.startswith("start: call\n")
    named = tools.forced_calls(_req(tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert named.startswith("start: call\n")
