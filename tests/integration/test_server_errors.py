"""Bad requests: each gets its status and OpenAI-shaped error naming the field; the server keeps serving."""

from __future__ import annotations

from typing import NamedTuple

import httpx
import openai
import pytest

MODEL = "tiny-llada"
MSG = [{"role": "user", "content": "Copy the list: a b"}]


def chat(**fields):
    return ("/v1/chat/completions", {"model": MODEL, "messages": MSG, "max_tokens": 8, **fields})


def completion(**fields):
    return ("/v1/completions", {"model": MODEL, "prompt": "Copy: a b", "max_tokens": 8, **fields})


def response(**fields):
    return ("/v1/responses", {"model": MODEL, "input": "Copy: a b", "max_output_tokens": 8, **fields})


def raw(path: str, content: bytes, content_type: str = "application/json"):
    """A body sent as these bytes (not JSON-encoded by the test)."""
    return (path, Raw(content, content_type))


class Raw(NamedTuple):
    content: bytes
    content_type: str


INV = "invalid_request_error"
DEEP = b'{"model": "tiny-llada", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
BIG = 2**64  # one past the 64-bit range
TOO_LARGE = b'{"model": "tiny-llada", "prompt": "' + b"x" * (2 * 1024 * 1024) + b'"}'

# (id, (path, body), status, error.type, error.param)
CASES = [
    ("unknown-field", chat(foo=1), 400, INV, "foo"),
    ("logprobs-not-bool", chat(logprobs=1), 400, INV, "logprobs"),
    ("top-logprobs", chat(top_logprobs=2), 400, INV, "top_logprobs"),
    (
        "tool-name",
        chat(tools=[{"type": "function", "function": {"name": "a b"}}]),
        400,
        INV,
        "tools[0].function.name",
    ),
    ("tool-choice-without-tools", chat(tool_choice="required"), 400, INV, "tool_choice"),
    ("response-format-type", chat(response_format={"type": "xml"}), 400, INV, "response_format.type"),
    ("legacy-functions", chat(functions=[{"name": "f"}]), 400, INV, "functions"),
    ("presence-penalty", chat(presence_penalty=0.5), 400, INV, "presence_penalty"),
    ("logit-bias", chat(logit_bias={"1": 5}), 400, INV, "logit_bias"),
    ("echo-generating", completion(echo=True), 400, INV, "max_tokens"),
    ("logprobs-too-many", completion(logprobs=21), 400, INV, "logprobs"),
    ("completion-max-tokens-zero", completion(max_tokens=0), 400, INV, "max_tokens"),
    ("best-of", completion(best_of=3), 400, INV, "best_of"),
    ("max-tokens-zero", chat(max_tokens=0), 400, INV, "max_tokens"),
    ("max-tokens-string", chat(max_tokens="12"), 400, INV, "max_tokens"),
    ("temperature-negative", chat(temperature=-1), 400, INV, "temperature"),
    ("top-p-zero", chat(top_p=0), 400, INV, "top_p"),
    ("unknown-algorithm", chat(algorithm="nope"), 400, INV, "algorithm"),
    ("unknown-generation-algorithm", chat(generation_algorithm="nope"), 400, INV, "algorithm"),
    (
        "algorithm-conflict",
        chat(algorithm="llada", generation_algorithm="dual"),
        400,
        INV,
        "generation_algorithm",
    ),
    ("steps-not-multiple", chat(max_tokens=32, block_length=8, steps=6), 400, INV, "steps"),
    ("max-steps-per-block-zero", chat(max_steps_per_block=0), 400, INV, "max_steps_per_block"),
    (
        "max-steps-per-block-schedule",
        chat(algorithm="llada", max_steps_per_block=4),
        400,
        INV,
        "max_steps_per_block",
    ),
    ("block-length-zero", chat(block_length=0), 400, INV, "block_length"),
    ("remasking", chat(remasking="bogus"), 400, INV, "remasking"),
    (
        "low-above-threshold",
        chat(algorithm="dinfer_hierarchy", threshold=0.5, low_threshold=0.8),
        400,
        INV,
        "low_threshold",
    ),
    ("cfg-with-cache", chat(cfg_scale=1.0), 400, INV, "cfg_scale"),
    ("seed-negative", chat(seed=-1), 400, INV, "seed"),
    ("early-stop-not-bool", chat(early_stop="yes"), 400, INV, "early_stop"),
    ("messages-missing", ("/v1/chat/completions", {"model": MODEL}), 400, INV, "messages"),
    ("messages-empty", chat(messages=[]), 400, INV, "messages"),
    ("role-function", chat(messages=[{"role": "function", "content": "x"}]), 400, INV, "messages[0].role"),
    (
        "image-part",
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        INV,
        "messages[0].content",
    ),
    ("n-zero", chat(n=0), 400, INV, "n"),
    ("too-many-stops", chat(stop=["a", "b", "c", "d", "e"]), 400, INV, "stop"),
    ("empty-stop", chat(stop=[""]), 400, INV, "stop"),
    (
        "stream-options-without-stream",
        chat(stream_options={"include_usage": True}),
        400,
        INV,
        "stream_options",
    ),
    ("context-too-long", chat(max_tokens=1100), 400, INV, "messages"),  # tiny-llada: 1024 positions
    ("prompt-bad-type", completion(prompt=123), 400, INV, "prompt"),
    ("prompt-token-out-of-range", completion(prompt=[1, 99999]), 400, INV, "prompt"),
    ("wrong-model", chat(model="gpt-4o"), 404, INV, "model"),
    # issue 14: no 500s from input; conformance; request size and content type
    ("nested-100000-deep", raw("/v1/chat/completions", DEEP), 400, INV, None),
    ("seed-2^64", chat(seed=18446744073709551616), 400, INV, "seed"),
    ("max-tokens-2^64", chat(max_tokens=BIG), 400, INV, "max_tokens"),
    ("max-completion-tokens-2^64", chat(max_completion_tokens=BIG), 400, INV, "max_completion_tokens"),
    ("steps-2^64", chat(steps=BIG), 400, INV, "steps"),
    ("block-length-2^64", chat(block_length=BIG), 400, INV, "block_length"),
    ("prefix-look-2^64", chat(prefix_look=BIG), 400, INV, "prefix_look"),
    ("n-2^64", chat(n=BIG), 400, INV, "n"),
    ("completion-seed-2^64", completion(seed=BIG), 400, INV, "seed"),
    ("chat-model-missing", ("/v1/chat/completions", {"messages": MSG}), 400, INV, "model"),
    ("completion-model-missing", ("/v1/completions", {"prompt": "x"}), 400, INV, "model"),
    (
        "response-format-json-schema",
        chat(response_format={"type": "json_schema"}),
        400,
        INV,
        "response_format.json_schema",
    ),
    (
        "audio-part",
        chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]),
        400,
        INV,
        "messages[0].content",
    ),
    ("text-plain", raw("/v1/chat/completions", b'{"model": "tiny-llada"}', "text/plain"), 415, INV, None),
    ("form-post", raw("/v1/completions", b"prompt=x", "application/x-www-form-urlencoded"), 415, INV, None),
    ("body-over-limit", raw("/v1/completions", TOO_LARGE), 413, INV, None),
    ("responses-model-missing", ("/v1/responses", {"input": "x"}), 400, INV, "model"),
    ("responses-input-missing", ("/v1/responses", {"model": MODEL}), 400, INV, "input"),
    ("responses-web-search-tool", response(tools=[{"type": "web_search"}]), 400, INV, "tools"),
    (
        "responses-tool-choice-unknown-function",
        response(tools=[{"type": "function", "name": "f"}], tool_choice={"type": "function", "name": "g"}),
        400,
        INV,
        "tool_choice",
    ),
    (
        "responses-image",
        response(input=[{"role": "user", "content": [{"type": "input_image"}]}]),
        400,
        INV,
        "input",
    ),
    (
        "responses-call-output-without-call-id",
        response(input=[{"type": "function_call_output", "output": "x"}]),
        400,
        INV,
        "input",
    ),
    ("responses-previous-id", response(previous_response_id="resp_x"), 400, INV, "previous_response_id"),
    ("responses-unknown-format", response(text={"format": {"type": "yaml"}}), 400, INV, "text.format"),
    (
        "responses-schema-invalid",
        response(text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "strin"}}}),
        400,
        INV,
        "text.format",
    ),
    ("responses-store", response(store=True), 400, INV, "store"),
    ("responses-max-output-zero", response(max_output_tokens=0), 400, INV, "max_output_tokens"),
    ("responses-seed-2^64", response(seed=BIG), 400, INV, "seed"),
    ("responses-context", response(max_output_tokens=1100), 400, INV, "input"),
    ("responses-unknown-algorithm", response(algorithm="nope"), 400, INV, "algorithm"),
]


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory("--load-format", "dummy")


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def _check(resp: httpx.Response, status: int, kind: str, param: str | None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == kind, body
    assert body["error"]["param"] == param, body
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("path_body", "status", "kind", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request(http, path_body, status, kind, param) -> None:
    path, body = path_body
    if isinstance(body, Raw):
        resp = http.post(path, content=body.content, headers={"content-type": body.content_type})
    else:
        resp = http.post(path, json=body)
    _check(resp, status, kind, param)


def test_context_error_names_both_numbers(http) -> None:
    path, body = chat(max_tokens=1100)
    err = _check(http.post(path, json=body), 400, INV, "messages")
    assert "1024" in err["message"] and "1100" in err["message"] and err["code"] == "context_length_exceeded"


def test_not_json_unknown_route_and_method(http) -> None:
    resp = http.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    _check(resp, 400, INV, None)
    _check(http.post("/v1/chat/completions", json=[1, 2]), 400, INV, None)
    _check(http.get("/v1/nope"), 404, INV, None)
    _check(http.get("/v1/chat/completions"), 405, INV, None)


def test_openai_client_sees_typed_errors(server) -> None:
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=MODEL, messages=MSG, max_tokens=32, extra_body={"steps": 3, "block_length": 8}
        )
    assert bad.value.param == "steps" and bad.value.type == INV
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(
            model=MODEL,
            messages=MSG,
            tools=[{"type": "function", "function": {"name": "f"}}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "strin"}},
            },
        )
    assert tools.value.param == "response_format" and "strin" in tools.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="other", messages=MSG)
    assert missing.value.code == "model_not_found"


def test_still_serving_after_all_errors(server, http) -> None:
    assert len(CASES) >= 15
    path, body = chat(max_tokens=8)
    resp = http.post(path, json=body)
    assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert server.health()["status"] == "ready"
    assert "Traceback" not in server.log()
