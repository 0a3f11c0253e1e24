"""The Responses API's output items from committed text (server/responses_api.OutputItems): items in
the order the model wrote them, no message item for white space around calls, and the stream's
events describing exactly the items of the non-streamed answer, however the text is chunked."""

from __future__ import annotations

import json
import random
from typing import Any

from dllm_serve.server.responses_api import OutputItems

CALL_F = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
CALL_G = '<tool_call>{"name": "g", "arguments": {}}</tool_call>'


def _items(text: str, with_tools: bool = True, finish: str = "stop") -> list[dict[str, Any]]:
    out = OutputItems(with_tools)
    out.feed(text)
    out.finish(finish)
    return out.items


def _summary(items: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    return [
        ("message", i["status"], i["content"][0]["text"])
        if i["type"] == "message"
        else ("function_call", i["status"], i["name"], i["arguments"])
        for i in items
    ]


def _replay(events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The items a client accumulates from the events (as the openai SDK's stream state does)."""
    items: dict[int, dict[str, Any]] = {}
    done: dict[int, dict[str, Any]] = {}
    for kind, e in events:
        if kind == "response.output_item.added":
            assert e["output_index"] == len(items), "output_index counts items in order"
            items[e["output_index"]] = json.loads(json.dumps(e["item"]))
        elif kind == "response.content_part.added":
            items[e["output_index"]]["content"].append(dict(e["part"]))
        elif kind == "response.output_text.delta":
            assert e["item_id"] == items[e["output_index"]]["id"]
            items[e["output_index"]]["content"][e["content_index"]]["text"] += e["delta"]
        elif kind == "response.function_call_arguments.delta":
            assert e["item_id"] == items[e["output_index"]]["id"]
            items[e["output_index"]]["arguments"] += e["delta"]
        elif kind == "response.function_call_arguments.done":
            assert e["arguments"] == items[e["output_index"]]["arguments"]
        elif kind == "response.output_text.done":
            assert e["text"] == items[e["output_index"]]["content"][0]["text"]
        elif kind == "response.output_item.done":
            done[e["output_index"]] = e["item"]
            accumulated = items[e["output_index"]]
            assert accumulated["id"] == e["item"]["id"]
            assert accumulated.get("arguments") == e["item"].get("arguments")
            assert accumulated.get("content") == e["item"].get("content")
    assert sorted(done) == sorted(items), "every item added is done"
    return [done[i] for i in sorted(done)]


def test_items_in_the_order_written_and_no_blank_message() -> None:
    assert _summary(_items(f"Sure.\n{CALL_F}\n{CALL_G}\n")) == [
        ("message", "completed", "Sure.\n"),
        ("function_call", "completed", "f", '{"a": 1}'),
        ("function_call", "completed", "g", "{}"),
    ]
    assert _summary(_items(f"\n {CALL_F}\n")) == [("function_call", "completed", "f", '{"a": 1}')]
    assert _summary(_items(f"{CALL_F}\nDone.", finish="length")) == [
        ("function_call", "completed", "f", '{"a": 1}'),
        ("message", "incomplete", "\nDone."),
    ]
    call = _items(CALL_F)[0]
    assert call["id"].startswith("fc_") and call["call_id"].startswith("call_")


def test_text_only_answers_always_have_one_message() -> None:
    assert _summary(_items("", with_tools=False)) == [("message", "completed", "")]
    assert _summary(_items("  ", with_tools=False)) == [("message", "completed", "  ")]
    assert _summary(_items(" hi", with_tools=False, finish="length")) == [("message", "incomplete", " hi")]
    assert _summary(_items(f"{CALL_F}", with_tools=False)) == [("message", "completed", CALL_F)]
    assert _summary(_items("<tool_call>not json</tool_call>")) == [
        ("message", "completed", "<tool_call>not json</tool_call>")
    ]


def test_stream_events_describe_the_same_items_however_chunked() -> None:
    rng = random.Random(0)
    texts = [f"Sure.\n{CALL_F}\n{CALL_G}\n", f"  {CALL_F}", f"{CALL_F}\nDone.", "plain text", ""]
    for text in texts:
        for _ in range(20):
            cuts = sorted(rng.sample(range(len(text) + 1), min(len(text), rng.randint(0, 6))))
            chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            out = OutputItems(True)
            events = [e for chunk in chunks for e in out.feed(chunk)] + out.finish("stop")
            assert _replay(events) == out.items
            assert _summary(out.items) == _summary(_items(text))
