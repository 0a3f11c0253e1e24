"""OpenAI conformance: response fields the spec requires, nulls meaning defaults, x-request-id, and
POST /v1/responses driven by the official client (plain and streamed): text, structured output
(``responses.parse`` / ``.stream`` with ``text_format``), function tools (forced calls, a tool loop)
and what it still refuses. The server runs random weights: every valid output is the grammar's."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

MODEL = "tiny-llada"
MSG = [{"role": "user", "content": "Copy the list: a b"}]
FAST = {"block_length": 8}


class Point(BaseModel):
    x: int
    label: Literal["a", "b"]


class Weather(BaseModel):
    """Get the weather for a city."""

    city: str
    unit: Literal["c", "f"]


WEATHER = openai.pydantic_function_tool(Weather, name="get_weather")
NAMED = {"type": "function", "name": "get_weather"}
CALL_TOKENS = 96  # room for one call with the tiny vocabulary


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory("--load-format", "dummy", "--verbose")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120)


def _post(server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(server.v1 + path, json=body, timeout=120, **kw)


def test_chat_fields_the_spec_requires(server) -> None:
    resp = _post(server, "/chat/completions", {"model": MODEL, "messages": MSG, "max_tokens": 8, **FAST})
    choice = resp.json()["choices"][0]
    assert choice["message"]["refusal"] is None and choice["message"]["annotations"] == []
    assert "logprobs" in choice and choice["logprobs"] is None
    body = {"model": MODEL, "messages": MSG, "max_tokens": 8, "stream": True, **FAST}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=120) as r:
        first = json.loads(next(line for line in r.iter_lines() if line.startswith("data: "))[6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert first["choices"][0]["logprobs"] is None


def test_model_is_required_and_nulls_mean_defaults(server) -> None:
    for path, body in (("/chat/completions", {"messages": MSG}), ("/completions", {"prompt": "x"})):
        resp = _post(server, path, {**body, "max_tokens": 8})
        assert resp.status_code == 400
        assert resp.json()["error"]["param"] == "model"
        assert resp.json()["error"]["code"] == "missing_required_parameter"
    resp = _post(
        server,
        "/chat/completions",
        {"model": MODEL, "messages": MSG, "max_tokens": 8, "n": None, "stream": None},
    )
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 1
    assert resp.json()["object"] == "chat.completion"


def test_request_id_header_and_log(server) -> None:
    mine = "conformance-test-7f3a"
    resp = _post(
        server,
        "/chat/completions",
        {"model": MODEL, "messages": MSG, "max_tokens": 8},
        headers={"x-request-id": mine},
    )
    assert resp.headers["x-request-id"] == mine
    fresh = _post(server, "/chat/completions", {"model": MODEL, "messages": MSG, "max_tokens": 8})
    assert fresh.headers["x-request-id"].startswith("req-")
    assert fresh.headers["x-request-id"] != mine
    bad = httpx.get(server.v1 + "/models", headers={"x-request-id": "a b\tc" + "x" * 200})
    assert bad.headers["x-request-id"].startswith("req-")  # not echoed: not a sane id
    for error in (httpx.get(server.v1 + "/nope"), httpx.post(server.v1 + "/completions", content=b"x")):
        assert error.status_code in (404, 415) and error.headers["x-request-id"].startswith("req-")
    assert f"[{mine}]" in server.log()


def test_responses_api_with_the_openai_client(client) -> None:
    resp = client.responses.create(
        model=MODEL,
        instructions="Answer briefly.",
        input="Copy the list: a b c",
        max_output_tokens=16,
        extra_body={**FAST, "seed": 3},
    )
    assert resp.id.startswith("resp_") and resp.object == "response" and resp.model == MODEL
    assert resp.status in ("completed", "incomplete")
    if resp.status == "incomplete":
        assert resp.incomplete_details.reason == "max_output_tokens" and resp.usage.output_tokens == 16
    (item,) = resp.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert resp.output_text == item.content[0].text
    assert resp.usage.input_tokens > 5
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    assert resp.store is False

    events = list(
        client.responses.create(
            model=MODEL,
            instructions="Answer briefly.",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "Copy the list: a b c"}]}],
            max_output_tokens=16,
            stream=True,
            extra_body={**FAST, "seed": 3},
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    final = events[-1]
    assert final.type == f"response.{resp.status}"  # same seed, same answer
    assert set(kinds[4:-4]) <= {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.response.output_text == resp.output_text
    assert final.response.usage.output_tokens == resp.usage.output_tokens


def test_responses_parse_with_a_schema(client) -> None:
    """``text_format`` maps onto the chat path's json_schema constraint: the output always parses."""
    common = {"model": MODEL, "input": "A point, please.", "text_format": Point, "max_output_tokens": 32}
    for seed in range(2):
        resp = client.responses.parse(**common, temperature=1.0, extra_body={**FAST, "seed": seed})
        assert resp.status == "completed"
        assert isinstance(resp.output_parsed, Point), resp.output_text
        assert [item.type for item in resp.output] == ["message"]
        fmt = resp.text.format
        assert fmt.type == "json_schema" and fmt.name == "Point" and fmt.strict is True
        assert fmt.schema_["required"] == ["x", "label"]
    with client.responses.stream(**common, extra_body={**FAST, "seed": 5}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert isinstance(final.output_parsed, Point)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert Point.model_validate_json(text) == final.output_parsed
    assert [e.sequence_number for e in events] == list(range(len(events)))

    resp = client.responses.create(
        model=MODEL,
        input="Any JSON object.",
        text={"format": {"type": "json_object"}},
        max_output_tokens=32,
        extra_body=FAST,
    )
    assert isinstance(json.loads(resp.output_text), dict) and resp.text.format.type == "json_object"


def test_responses_forced_tool_calls(client) -> None:
    """A named call: one function_call item (no message), arguments valid for the function;
    ``required`` over two tools: one or more calls, each valid for the function it names."""
    resp = client.responses.parse(
        model=MODEL,
        input="Weather in Paris?",
        tools=[WEATHER],
        tool_choice=NAMED,
        temperature=1.0,
        max_output_tokens=CALL_TOKENS,
        extra_body={**FAST, "seed": 1},
    )
    (call,) = resp.output
    assert call.type == "function_call" and call.status == "completed" and call.name == "get_weather"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert isinstance(call.parsed_arguments, Weather), call.arguments
    assert resp.tool_choice.type == "function" and resp.tool_choice.name == "get_weather"
    assert [t.name for t in resp.tools] == ["get_weather"] and resp.parallel_tool_calls is True

    address = {
        "type": "function",
        "name": "set_zip",
        "parameters": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
    }
    tools = [{"type": "function", **WEATHER["function"]}, address]
    resp = client.responses.create(
        model=MODEL,
        input="Weather in Oslo, and set the zip.",
        tools=tools,
        tool_choice="required",
        max_output_tokens=CALL_TOKENS,
        extra_body={**FAST, "seed": 2},
    )
    assert resp.output and all(item.type == "function_call" for item in resp.output)
    for call in resp.output:
        params = next(t["parameters"] for t in tools if t["name"] == call.name)
        jsonschema.validate(json.loads(call.arguments), params)


def test_responses_streamed_tool_call(client) -> None:
    """OpenAI's events for a function call, with output_index and sequence numbers; the SDK's
    ``.stream()`` accumulates them into the final response with the parsed arguments."""
    with client.responses.stream(
        model=MODEL,
        input="Weather in Rome?",
        tools=[WEATHER],
        tool_choice=NAMED,
        max_output_tokens=CALL_TOKENS,
        extra_body={**FAST, "seed": 3},
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added, delta, done, item_done = events[2:6]
    assert added.item.type == "function_call" and added.item.name == "get_weather"
    assert {added.output_index, delta.output_index, done.output_index, item_done.output_index} == {0}
    assert delta.item_id == done.item_id == added.item.id == item_done.item.id
    assert delta.delta == done.arguments == item_done.item.arguments
    (call,) = final.output
    assert call.call_id == item_done.item.call_id and isinstance(call.parsed_arguments, Weather)
    assert final.status == "completed"


def test_responses_tool_loop(client) -> None:
    """call -> function_call_output -> answer: the earlier call and its result are the history."""
    question = {"role": "user", "content": "Weather in Paris?"}
    first = client.responses.parse(
        model=MODEL,
        input=[question],
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=CALL_TOKENS,
        extra_body=FAST,
    )
    (call,) = first.output
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "21 degrees"}
    common = {"model": MODEL, "max_output_tokens": 8, "extra_body": FAST}
    answer = client.responses.parse(input=[question, call, result], tools=[WEATHER], **common)
    assert answer.status in ("completed", "incomplete")
    assert {item.type for item in answer.output} <= {"message", "function_call"}
    plain = client.responses.create(input=[question, call, result], tool_choice="none", **common)
    assert [item.type for item in plain.output] == ["message"]
    without_call = client.responses.create(input=[question, result], tool_choice="none", **common)
    # the call is in the prompt: about as many tokens as the model wrote for it
    added = plain.usage.input_tokens - without_call.usage.input_tokens
    assert added >= first.usage.output_tokens // 2, (added, first.usage.output_tokens)


def test_responses_api_refuses_what_it_cannot_do(client) -> None:
    cases = [
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tools": [WEATHER]}, "tools"),  # chat's nested shape
        ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
        (
            {"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
            "tool_choice",
        ),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"text": {"format": {"type": "yaml"}}}, "text.format"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "strin"}}}},
            "text.format",
        ),
        ({"text": {"format": {"type": "json_object"}}, "max_output_tokens": 2}, "max_output_tokens"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": 1100}, "input"),
        (
            {
                "input": [
                    {
                        "role": "user",
                        "content": [{"type": "input_image", "image_url": "data:image/png;base64,"}],
                    }
                ]
            },
            "input",
        ),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input"),  # no call_id
    ]
    for fields, param in cases:
        kwargs = {"model": MODEL, "input": "hi", **fields}
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(**kwargs)
        assert exc.value.param == param, (fields, exc.value.body)
