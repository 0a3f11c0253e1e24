"""32 concurrent clients with mixed algorithms, lengths and endpoints each get exactly what they get alone.

Continuous batching puts them in one running batch (sequences join and leave between iterations);
on CPU in float32 a request's tokens must not depend on its batch-mates.
"""

from __future__ import annotations

import asyncio
import itertools

import httpx
import openai
import pytest

MODEL = "tiny-llada"
ALGORITHMS = ["llada", "prefix_cache", "dual_cache", "dinfer_blockwise", "dinfer_hierarchy", "dinfer_credit"]
LENGTHS = [8, 16, 24, 40]


def _requests() -> list[dict]:
    out = []
    combos = itertools.cycle(itertools.product(ALGORITHMS, LENGTHS))
    for i in range(32):
        algorithm, max_tokens = next(combos)
        extra = {"algorithm": algorithm, "block_length": 8}
        kind = "chat" if i % 2 == 0 else "completion"
        req = {"kind": kind, "max_tokens": max_tokens, "seed": 100 + i, "extra_body": extra}
        if i % 3 == 0:
            req["temperature"] = 1.0
        if i % 5 == 0:
            req["stream"] = True
        req["content"] = f"Copy the list: {' '.join('abcdefghij'[: 3 + i % 7])}"
        out.append(req)
    return out


async def _run(client: openai.AsyncOpenAI, req: dict) -> tuple[str, str, int]:
    kw = {k: req[k] for k in ("max_tokens", "seed", "extra_body") if k in req}
    if "temperature" in req:
        kw["temperature"] = req["temperature"]
    stream = req.get("stream", False)
    if req["kind"] == "chat":
        messages = [{"role": "user", "content": req["content"]}]
        if not stream:
            r = await client.chat.completions.create(model=MODEL, messages=messages, **kw)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
        text, finish, usage = "", "", -1
        s = await client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}, **kw
        )
        async for chunk in s:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, finish, usage
    if not stream:
        r = await client.completions.create(model=MODEL, prompt=req["content"], **kw)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
    text, finish, usage = "", "", -1
    s = await client.completions.create(
        model=MODEL, prompt=req["content"], stream=True, stream_options={"include_usage": True}, **kw
    )
    async for chunk in s:
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage.completion_tokens
    return text, finish, usage


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory("--load-format", "dummy", "--max-batch-size", "32")


def test_32_concurrent_clients_match_their_solo_runs(server) -> None:
    requests = _requests()

    async def main() -> tuple[list, list, int]:
        client = openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=300)
        alone = [await _run(client, r) for r in requests]
        peak = 0
        done = asyncio.Event()

        async def watch() -> None:
            nonlocal peak
            async with httpx.AsyncClient() as http:
                while not done.is_set():
                    peak = max(peak, (await http.get(server.base_url + "/health")).json()["running"])
                    await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        together = await asyncio.gather(*(_run(client, r) for r in requests))
        done.set()
        await watcher
        await client.close()
        return alone, together, peak

    alone, together, peak = asyncio.run(main())
    assert all(a[1] in ("stop", "length") for a in alone)
    assert sum(len(a[0]) for a in alone) > 0
    for i, (a, t) in enumerate(zip(alone, together, strict=True)):
        assert t == a, f"request {i} ({requests[i]['extra_body']['algorithm']}) differs when batched"
    assert peak >= 8, f"the requests should have run batched together (peak running {peak})"
