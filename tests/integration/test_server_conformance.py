"""OpenAI conformance: response fields the spec requires, nulls meaning defaults, x-request-id, and
POST /v1/responses driven by the official client (plain and streamed)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

MODEL = "tiny-llada"
MSG = [{"role": "user", "content": "Copy the list: a b"}]
FAST = {"block_length": 8}


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


def test_responses_api_refuses_what_it_cannot_do(client) -> None:
    cases = [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"text": {"format": {"type": "json_object"}}}, "text"),
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
    ]
    for fields, param in cases:
        kwargs = {"model": MODEL, "input": "hi", **fields}
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(**kwargs)
        assert exc.value.param == param, (fields, exc.value.body)
