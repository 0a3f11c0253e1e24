"""`dllm-serve serve --replicas 2` under real Ray Serve: two CPU replicas of the bundled tiny-llada.

Concurrent requests (plain and streamed) answer exactly what one request alone answers; /metrics
covers both replicas; killing one replica's process under load loses no request that had not sent a
token yet (it is retried on the other replica), ends streams that had with an SSE error event in
OpenAI's shape, loses none that arrive afterwards, and Ray brings the replica back.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dllm_serve.bench.tasks import heldout_examples
from dllm_serve.cluster.front import FAILED_MESSAGE, carries_tokens
from dllm_serve.cluster.replicas import DEPLOYMENT_NAME, merge_prometheus
from tests.dream_helpers import TINY_DREAM
from tests.helpers import TINY_LLADA
from tests.integration.conftest import free_port
from tests.llada2_helpers import TINY_LLADA2
from tests.nemotron_labs_helpers import TINY_LABS
from tests.sdar_helpers import TINY_SDAR, TINY_SDAR_MOE

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="needs ray[serve] (pip install -e '.[ray]')"
)

EXAMPLES = heldout_examples(4)
PROMPTS = [e.prompt for e in EXAMPLES]
MAX_TOKENS = 32


def test_metrics_of_replicas_merge_into_one_exposition():
    a = '# HELP req_total Requests.\n# TYPE req_total counter\nreq_total{code="200"} 3.0\nup 1\n'
    b = '# HELP req_total Requests.\n# TYPE req_total counter\nreq_total{code="200"} 4.0\n'
    text = merge_prometheus({"r1": a, "r2": b})
    assert text.count("# HELP req_total") == 1 and text.count("# TYPE req_total") == 1
    lines = text.splitlines()
    i, j = (
        lines.index('req_total{replica="r1",code="200"} 3.0'),
        lines.index('req_total{replica="r2",code="200"} 4.0'),
    )
    assert abs(i - j) == 1, "a family's samples stay together"
    assert 'up{replica="r1"} 1' in lines


def test_single_replica_server_does_not_import_ray():
    code = (
        "import sys, dllm_serve.cli as c; c.build_parser(); import dllm_serve.server.app;"
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


STREAMS = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPTS[0]}]}),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": PROMPTS[0]}], "stream_mode": "denoise"},
    ),
    ("/v1/completions", {"prompt": PROMPTS[0]}),
    ("/v1/responses", {"input": PROMPTS[0]}),
]


@pytest.fixture(scope="module")
def single(server_factory):
    """A single-process server: what each replica streams to the front."""
    return server_factory("--device", "cpu")


@pytest.mark.parametrize(("path", "fields"), STREAMS)
def test_front_holds_back_only_what_a_stream_sends_before_its_first_token(single, path, fields):
    """The front may retry a stream only while it has sent nothing past its preamble: check its
    classifier against what a real server streams, so a change of the chunk format shows here."""
    body = {"model": "tiny-llada", "stream": True, "max_tokens": 32, "temperature": 0, **fields}
    if path == "/v1/responses":
        body["max_output_tokens"] = body.pop("max_tokens")
    with httpx.stream("POST", single.base_url + path, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    held = 0
    while held < len(events) and not carries_tokens(events[held].encode()):
        held += 1
    assert held < len(events), events
    first = json.loads(events[held][6:])
    text = json.dumps(first)
    # The first event let through has text, a finish or a denoise step; nothing before it had.
    assert re.search(r'"denoise"|"(content|text|delta|finish_reason)": "[^"]', text), first
    assert held <= 4, events[:held]  # only an opening: chat's role chunk, the Responses preamble
    for line in events[:held]:
        assert not re.search(r'"denoise"|"(content|text|delta|finish_reason)":"[^"]', line), line


def _descendants(root: int) -> dict[int, str]:
    """pid -> command line of every process below ``root``."""
    parents: dict[int, int] = {}
    cmds: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            pid = int(stat.parent.name)
            parents[pid] = int(text.rsplit(")", 1)[1].split()[1])
            cmds[pid] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    out, frontier = {}, [root]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in out:
                out[child] = cmds.get(child, "")
                frontier.append(child)
    return out


def replica_pids(server_pid: int) -> list[int]:
    """The engine replicas' processes (not the front's, which is a Serve replica too)."""
    return sorted(
        p
        for p, cmd in _descendants(server_pid).items()
        if cmd.startswith("ray::ServeReplica") and DEPLOYMENT_NAME in cmd
    )


def wait_replicas_ready(base: str, proc: subprocess.Popen, n: int, timeout: float, log: Path) -> dict:
    """Poll /health until ``n`` replicas report ready (a deadline, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited {proc.returncode}:\n{log.read_text()[-4000:]}"
        try:
            r = httpx.get(f"{base}/health", timeout=5)
            if r.status_code == 200:
                body = r.json()
                if body.get("replicas_ready") == n and len(replica_pids(proc.pid)) == n:
                    return body
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{n} replicas not ready in {timeout}s (last {body}):\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def serve_replicas(model: Path, log: Path, replicas: int = 2):
    """``serve --replicas N`` of ``model`` until every replica is ready; stopped with SIGTERM after,
    checking that it stops in time and leaves no Ray process behind. Yields (process, base URL)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DLLM_SERVE_RAY_OBJECT_STORE_MB": "100"}
    argv = [
        sys.executable, "-m", "dllm_serve.cli", "serve", "--replicas", str(replicas), "--device", "cpu",
        "--model-path", str(model), "--port", str(port), "--max-batch-size", "4",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_replicas_ready(base, proc, replicas, 300, log)
        yield proc, base
    finally:
        below = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise AssertionError("server did not stop within 90 s of SIGTERM") from None
        # the ray processes are reaped by the server's shutdown; check they are gone
        alive = [p for p in below if Path(f"/proc/{p}").exists() and "ray::" in below[p]]
        assert not alive, f"ray processes left behind: {alive}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    with serve_replicas(TINY_LLADA, log) as (proc, base):
        yield proc, base, log


def _client(base: str):
    import openai

    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=180)


async def _ask(client, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    models = await client.models.list()
    r = await client.chat.completions.create(
        model=models.data[0].id,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        seed=7,
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    return r.choices[0].message.content


async def _ask_stream(client, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    models = await client.models.list()
    stream = await client.chat.completions.create(
        model=models.data[0].id,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        seed=7,
        stream=True,
    )
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    return "".join(parts)


@pytest.fixture(scope="module")
def reference(server):
    """Each prompt's answer when it is the only request in flight."""
    _, base, _ = server

    async def run():
        client = _client(base)
        return {p: await _ask(client, p) for p in PROMPTS}

    return asyncio.run(run())


@needs_ray
def test_concurrent_load_on_two_replicas_answers_correctly(server, reference):
    _, base, _ = server

    async def run():
        client = _client(base)
        prompts = PROMPTS * 3
        plain = await asyncio.gather(*(_ask(client, p) for p in prompts))
        streamed = await asyncio.gather(*(_ask_stream(client, p) for p in PROMPTS))
        return prompts, plain, streamed

    prompts, plain, streamed = asyncio.run(run())
    assert all(reference.values()), reference
    assert plain == [reference[p] for p in prompts]
    assert streamed == [reference[p] for p in PROMPTS], "streaming through Ray Serve"


@needs_ray
def test_health_and_metrics_cover_both_replicas(server):
    _, base, _ = server
    health = httpx.get(f"{base}/health", timeout=10).json()
    assert health["replicas"] == 2 and health["replicas_ready"] == 2
    text = httpx.get(f"{base}/metrics", timeout=10).text
    assert "dllm_serve_replicas 2" in text
    assert len(set(re.findall(r'replica="([^"]+)"', text))) == 2, text[:2000]


# Long requests: a chat task whose answer comes first, then (no early stop) the rest of a 256-token
# canvas one token per step, so a request is still running when the replica dies and a stream has
# sent its answer by then.
LONG = {"algorithm": "llada", "block_length": 32, "logits_eos_inf": True, "early_stop": False}
LONG_TOKENS = 256


def _long_prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


async def _ask_long(client, i: int) -> str:
    models = await client.models.list()
    r = await client.chat.completions.create(
        model=models.data[0].id,
        messages=_long_prompt(i),
        max_tokens=LONG_TOKENS,
        temperature=0,
        extra_body=LONG,
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    return r.choices[0].message.content


async def _stream_long(client, i: int, first_token: asyncio.Event) -> str:
    models = await client.models.list()
    stream = await client.chat.completions.create(
        model=models.data[0].id,
        messages=_long_prompt(i),
        max_tokens=LONG_TOKENS,
        temperature=0,
        stream=True,
        extra_body=LONG,
    )
    parts = []
    async for c in stream:
        if c.choices and c.choices[0].delta.content:
            parts.append(c.choices[0].delta.content)
            first_token.set()
    return "".join(parts)


def _aborted(base: str) -> float:
    """Choices that ended with reason "abort", summed over the replicas' merged /metrics."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("dllm_serve_requests_finished_total{") and 'reason="abort"' in line
    )


@needs_ray
def test_client_disconnect_through_the_front_aborts_the_request(server):
    """A client that leaves mid-stream: the front cancels the replica call, the engine aborts."""
    _, base, _ = server
    before = _aborted(base)
    model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "messages": _long_prompt(0), "max_tokens": LONG_TOKENS, "stream": True, **LONG}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # the answer's first text: leave with most of the 256 steps to go
    deadline = time.monotonic() + 30
    while _aborted(base) <= before:
        assert time.monotonic() < deadline, "the request was not aborted on its replica"
        time.sleep(1.0)


@needs_ray
def test_killed_replica_restarts_and_unstarted_requests_survive(server, reference):
    import openai

    proc, base, log = server
    before = replica_pids(proc.pid)
    assert len(before) == 2
    victim = before[0]
    retries_before = log.read_text().count("retrying on another replica")

    async def run():
        client = _client(base)
        firsts = [asyncio.Event() for _ in range(4)]
        streams = [asyncio.create_task(_stream_long(client, i, e)) for i, e in enumerate(firsts)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), 120)
        plain = [asyncio.create_task(_ask_long(client, i)) for i in range(6)]
        await asyncio.sleep(1.0)  # the plain requests are running, none has answered yet
        assert not any(t.done() for t in plain)
        os.kill(victim, signal.SIGKILL)
        after = await asyncio.gather(*(_ask(client, p) for p in PROMPTS * 2), return_exceptions=True)
        plain_done = await asyncio.gather(*plain, return_exceptions=True)
        streamed = await asyncio.gather(*streams, return_exceptions=True)
        return plain_done, streamed, after

    plain_done, streamed, after = asyncio.run(run())
    # Nothing had been sent for a plain request: the victim's are retried on the other replica.
    assert all(isinstance(r, str) for r in plain_done), [repr(r) for r in plain_done]
    assert log.read_text().count("retrying on another replica") > retries_before, "no request was retried"
    # A stream that had sent tokens ends with an SSE error event in OpenAI's shape (the SDK raises it).
    cut = [r for r in streamed if not isinstance(r, str)]
    assert cut, "no stream was on the killed replica"
    for r in cut:
        assert isinstance(r, openai.APIError) and FAILED_MESSAGE in r.message, repr(r)
        assert r.body is None or r.body.get("code") == "replica_failed", r.body
    assert after == [reference[p] for p in PROMPTS * 2], [repr(a) for a in after]

    wait_replicas_ready(base, proc, 2, 180, log)
    now = replica_pids(proc.pid)
    assert victim not in now and len(now) == 2

    async def again():
        client = _client(base)
        return await asyncio.gather(*(_ask(client, p) for p in PROMPTS))

    assert asyncio.run(again()) == [reference[p] for p in PROMPTS]


@needs_ray
def test_replicas_get_the_drain_plus_a_margin_before_ray_stops_them():
    """Ray Serve must not kill a replica while it still drains and sends its abort errors."""
    from dllm_serve.cluster.replicas import REPLICA_SHUTDOWN_MARGIN_S, _deployment
    from dllm_serve.config import ServerConfig

    app = _deployment(ServerConfig(drain_timeout=12.0), 2, False, None)
    replica = app._bound_deployment.init_args[0]._bound_deployment  # the front's one argument
    assert replica.name == "DllmReplica"
    assert replica._deployment_config.graceful_shutdown_timeout_s == 12.0 + REPLICA_SHUTDOWN_MARGIN_S


@needs_ray
@pytest.mark.parametrize(
    "model", [TINY_DREAM, TINY_SDAR, TINY_SDAR_MOE, TINY_LABS, TINY_LLADA2], ids=lambda m: m.name
)
def test_each_new_family_serves_through_two_replicas(model, tmp_path):
    """The replica path is the same app for every family: each new family's bundled model, two
    replicas, concurrent plain and streamed requests, every answer the task's right answer."""
    with serve_replicas(model, tmp_path / "serve.log") as (_, base):

        async def run():
            client = _client(base)
            plain = await asyncio.gather(*(_ask(client, p, 64) for p in PROMPTS))
            streamed = await asyncio.gather(*(_ask_stream(client, p, 64) for p in PROMPTS))
            return plain, streamed

        plain, streamed = asyncio.run(run())
        health = httpx.get(f"{base}/health", timeout=10).json()
    answers = [e.answer for e in EXAMPLES]
    assert plain == answers and streamed == answers, (plain, streamed)
    assert health["replicas_ready"] == 2, health
