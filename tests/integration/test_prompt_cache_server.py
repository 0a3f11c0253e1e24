"""Prompt-cache reuse on a real server: a shared system prompt, the openai client, /metrics.

Two servers of one Nemotron-format checkpoint, one with the prompt cache (the default) and one with
``--prompt-cache-memory 0``, answer the same chat requests: texts and log-probabilities must be
equal (log-probabilities to 1e-5: a forward over fewer query rows may round differently in float32),
whether a request missed, hit, ran concurrently with others that hit, or followed a cancelled
stream. The checkpoint has random weights (the bundled tokenizer and chat template): the
trained tiny-nemotron answers a long system prompt with an empty turn, and its confident
probabilities would hide a small error in reused K/V.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from dllm_serve.bench.tasks import heldout_examples
from dllm_serve.models.tokenizer import ChatTokenizer
from tests.nemotron_helpers import (
    TINY_NEMOTRON,
    random_nemotron_config,
    random_nemotron_weights,
    write_nemotron_checkpoint,
)

MODEL = "m"
SYSTEM = " ".join(f"Rule {i}: answer the list task exactly, item by item." for i in range(15))
BLOCK = 32  # the checkpoint's block_size


@pytest.fixture(scope="module")
def servers(server_factory, tmp_path_factory):
    cfg = random_nemotron_config(max_position_embeddings=1024, block_size=BLOCK)
    path = tmp_path_factory.mktemp("prompt-cache") / MODEL
    write_nemotron_checkpoint(path, cfg, random_nemotron_weights(cfg, scale=0.3))
    on = server_factory("--model-path", str(path), "--max-batch-size", "8")
    off = server_factory("--model-path", str(path), "--prompt-cache-memory", "0")
    return on, off


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def ask(server, question: str, stream: bool = False, system: str = SYSTEM) -> tuple[str, list[float]]:
    """The answer's text and its tokens' log-probabilities (which show any change in the K/V,
    even one too small to change a token)."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    c = client(server)
    kw = dict(model=MODEL, messages=messages, max_tokens=64, seed=0, logprobs=True)
    if not stream:
        choice = c.chat.completions.create(**kw).choices[0]
        return choice.message.content, [t.logprob for t in choice.logprobs.content]
    text, logprobs = "", []
    for chunk in c.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            logprobs += [t.logprob for t in (ch.logprobs.content if ch.logprobs else None) or []]
    return text, logprobs


def same(got: tuple[str, list[float]], want: tuple[str, list[float]]) -> bool:
    """Equal texts, and log-probabilities equal to float32 rounding."""
    (text, lp), (want_text, want_lp) = got, want
    return (
        text == want_text
        and len(lp) == len(want_lp)
        and all(abs(a - b) <= 1e-5 for a, b in zip(lp, want_lp, strict=True))
    )


def counters(server) -> dict[str, float]:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    found = re.findall(r"^dllm_serve_prompt_cache_(\w+?)(?:_total)? ([0-9.e+]+)$", text, re.M)
    return {name: float(value) for name, value in found}


def test_a_shared_system_prompt_is_reused_and_the_answers_do_not_change(servers):
    on, off = servers
    tok = ChatTokenizer(TINY_NEMOTRON)
    shared = len(tok.render_chat([{"role": "system", "content": SYSTEM}]))
    assert shared >= 10 * BLOCK  # the system turn alone spans many full blocks
    questions = [ex.prompt for ex in heldout_examples(7, seed=5)]
    want = [ask(off, q) for q in questions]
    assert sum(len(lp) for _, lp in want) >= 7 * 8  # answers with tokens to compare
    assert counters(off)["lookups"] == 0

    assert same(ask(on, questions[0]), want[0])  # a miss: computes and stores the prefix
    with ThreadPoolExecutor(6) as pool:  # concurrent hits, streamed and not
        got = list(pool.map(lambda iq: ask(on, iq[1], stream=iq[0] % 2 == 1), enumerate(questions[1:])))
    assert all(same(g, w) for g, w in zip(got, want[1:], strict=True))
    c = counters(on)
    assert c["lookups"] == 7 and c["hits"] == 6, c
    assert c["reused_tokens"] >= 6 * (shared // BLOCK) * BLOCK, c
    assert 0 < c["used_bytes"] <= c["capacity_bytes"], c
    health = httpx.get(on.base_url + "/health", timeout=10).json()
    assert health["kv_cache"]["used_tokens"] == 0  # the cached blocks are not in the arena
    assert health["prompt_cache"]["used_bytes"] == c["used_bytes"] and health["prompt_cache"]["blocks"] > 0


def test_a_cancelled_stream_leaves_later_answers_exact(servers):
    on, off = servers
    question = heldout_examples(1, seed=9)[0].prompt
    system = "Be brief. " + SYSTEM  # a prefix no earlier request stored
    want = ask(off, question, system=system)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Copy the list: q r s"}]
    with client(on).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=448, stream=True, extra_body={"threshold": 1.0}
    ) as stream:
        next(iter(stream))  # the request is admitted (it may or may not store the prefix), then leaves
    assert same(ask(on, question, system=system), want)  # stores the prefix if the cancelled one did not
    hits = counters(on)["hits"]
    assert same(ask(on, question, stream=True, system=system), want)
    assert counters(on)["hits"] == hits + 1  # the stored prefix is reused, and exactly
