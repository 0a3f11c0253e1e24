"""API keys, and the server started with no model flags: the bundled tiny-llada's trained weights.

The key comes from DLLM_SERVE_API_KEY (the way SLURM jobs pass secrets); /v1 needs it, /health and
/metrics do not. The server binds 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

KEY = "sk-test-0123456789"
MODEL = "tiny-llada"


LOADING: list[tuple[int, dict]] = []  # /health answers seen before the model was ready


@pytest.fixture(scope="module")
def server(server_factory):
    server = server_factory(env={"DLLM_SERVE_API_KEY": KEY}, wait=False)  # no model flags at all
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and server.proc.poll() is None:
        try:
            resp = httpx.get(server.base_url + "/health", timeout=2)
        except httpx.HTTPError:
            time.sleep(0.05)
            continue
        if resp.status_code == 200:
            break
        chat = httpx.post(
            server.v1 + "/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
        )
        LOADING.append((resp.status_code, {**resp.json(), "chat": chat.status_code}))
    server.wait_ready()
    return server


def test_health_is_503_while_loading(server) -> None:
    assert LOADING, "the server should answer (503) while the model loads"
    status, body = LOADING[0]
    assert status == 503 and body["status"] == "loading" and body["model"] == MODEL
    assert body["chat"] == 503


def test_missing_and_wrong_keys_get_401(server) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        resp = httpx.get(server.v1 + "/models", headers=headers)
        assert resp.status_code == 401, headers
        err = resp.json()["error"]
        assert (
            err["type"] == "invalid_request_error"
            and err["code"] == "invalid_api_key"
            and err["param"] is None
        )
        assert KEY not in resp.text
    for bad in ("wrong-key", KEY[:-1]):
        client = openai.OpenAI(base_url=server.v1, api_key=bad, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as exc:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert exc.value.code == "invalid_api_key"
    resp = httpx.post(server.v1 + "/completions", json={"prompt": "x", "foo": 1})
    assert resp.status_code == 401  # authentication comes before validation


def test_probes_are_open(server) -> None:
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/metrics").status_code == 200


def test_openapi_schema_needs_the_key_and_docs_are_off(server) -> None:
    assert httpx.get(server.base_url + "/openapi.json").status_code == 401
    schema = httpx.get(server.base_url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
    auth = {"Authorization": f"Bearer {KEY}"}
    for path in ("/docs", "/redoc"):
        assert httpx.get(server.base_url + path, headers=auth).status_code == 404


def test_default_server_serves_bundled_model_with_key(server) -> None:
    health = server.health()
    assert (
        health["model"] == MODEL and health["device"] == "cpu" and health["algorithm"] == "dinfer_blockwise"
    )
    assert f"Uvicorn running on http://127.0.0.1:{server.port}" in server.log()
    client = openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [MODEL]
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Copy the list: k d r a m w e"}],
        max_tokens=32,
        extra_body={"algorithm": "llada", "block_length": 32},
    )
    choice = resp.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens >= 1
    if choice.finish_reason == "stop":  # the trained model ends its answer with a stop token
        assert resp.usage.completion_tokens <= 32
