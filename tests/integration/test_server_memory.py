"""The KV cache's memory budget on a real server (CPU, bundled tiny-llada, float32: 4 KiB per token).

With ``--kv-cache-memory 2MiB`` the arena holds 512 tokens, eight 64-token extents: 64 concurrent
clients are admitted as memory frees and each gets what it gets alone, while the KV memory held
never exceeds the budget. A budget too small for one sequence stops start-up with one line; an
injected engine-loop failure (``DLLM_SERVE_FAULTS``) fails requests, backs off, and ends in a failed
/health instead of a tight loop of tracebacks.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import httpx
import openai
import pytest

from tests.integration.conftest import ServerProcess

BUDGET = ["--kv-cache-memory", "2MiB", "--max-model-len", "256", "--max-batch-size", "64"]
BYTES_PER_TOKEN = 4096


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory(*BUDGET)


def _prompt(i: int) -> str:
    return f"Copy the list: {' '.join('abcdefghij'[: 2 + i % 6])}"


async def _complete(client: openai.AsyncOpenAI, i: int) -> str:
    r = await client.chat.completions.create(
        model="tiny-llada",
        messages=[{"role": "user", "content": _prompt(i)}],
        max_tokens=16,
        seed=i,
        temperature=1.0 if i % 3 == 0 else 0.0,
        extra_body={
            "algorithm": ["dual_cache", "dinfer_blockwise", "prefix_cache"][i % 3],
            "block_length": 8,
        },
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    return r.choices[0].message.content


def test_64_concurrent_requests_fit_the_budget_and_match_their_solo_runs(server) -> None:
    health = server.health()
    kv = health["kv_cache"]
    assert kv["bytes_per_token"] == BYTES_PER_TOKEN and kv["capacity_tokens"] == 512

    async def main() -> tuple[list[str], list[str], int]:
        client = openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=300)
        alone = [await _complete(client, i) for i in range(64)]
        peak_running = 0
        done = asyncio.Event()

        async def watch() -> None:
            nonlocal peak_running
            async with httpx.AsyncClient() as http:
                while not done.is_set():
                    h = (await http.get(server.base_url + "/health")).json()
                    peak_running = max(peak_running, h["running"])
                    assert h["kv_cache"]["used_tokens"] <= h["kv_cache"]["capacity_tokens"]
                    await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        together = await asyncio.gather(*(_complete(client, i) for i in range(64)))
        done.set()
        await watcher
        await client.close()
        return alone, together, peak_running

    alone, together, peak_running = asyncio.run(main())
    assert together == alone
    assert sum(map(len, alone)) > 0
    assert 2 <= peak_running <= 8, peak_running  # batched, but never more extents than the budget holds
    kv = server.health()["kv_cache"]
    assert kv["peak_used_tokens"] <= kv["capacity_tokens"] and kv["used_tokens"] == 0
    metrics = httpx.get(server.base_url + "/metrics").text
    peak = float(re.search(r"^dllm_serve_kv_cache_peak_used_bytes (\S+)$", metrics, re.M).group(1))
    capacity = float(re.search(r"^dllm_serve_kv_cache_capacity_bytes (\S+)$", metrics, re.M).group(1))
    assert 0 < peak <= capacity == 2 * 2**20


def test_a_request_that_could_never_fit_is_a_400_with_both_numbers(server) -> None:
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-llada", prompt=_prompt(0), max_tokens=256)
    message = err.value.body["message"]
    # Both numbers: the limit, and what was asked (the whole request, or - when the prompt is refused
    # from its length in characters, before tokenizing - its lower bound plus max_tokens).
    total = re.search(r"you requested (\d+) tokens", message)
    bound = re.search(r"at least (\d+) tokens long .* and (\d+) tokens are requested", message)
    asked = int(total.group(1)) if total else int(bound.group(1)) + int(bound.group(2))
    assert "maximum context length is 256 tokens" in message and asked > 256, message
    assert err.value.body["code"] == "context_length_exceeded"
    assert server.health()["status"] == "ready"


def test_a_budget_too_small_for_one_sequence_stops_start_up_with_one_line(tmp_path) -> None:
    server = ServerProcess(["--kv-cache-memory", "512KiB", "--max-model-len", "256"])
    try:
        assert server.proc.wait(120) == 1
    finally:
        server.stop()
    log = server.log()
    errors = [line for line in log.splitlines() if "KV cache cannot hold" in line]
    assert len(errors) == 1 and "Traceback" not in log, log
    assert "256 tokens need 256 x 4096 B" in errors[0] and "= 128 tokens" in errors[0], errors[0]
    cli = subprocess.run(
        [sys.executable, "-m", "dllm_serve.cli", "generate", "--kv-cache-memory", "512KiB", "hello"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    errors = [line for line in cli.stderr.splitlines() if "KV cache cannot hold" in line]
    assert len(errors) == 1 and "error:" in errors[0] and "1024 tokens need" in errors[0], cli.stderr
