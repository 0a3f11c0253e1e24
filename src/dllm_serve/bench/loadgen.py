"""Closed-loop load generator for an OpenAI-compatible server (`dllm-serve bench serve`).

``concurrency`` clients each send streamed chat completions back to back until ``requests`` have
been sent. Streaming gives the time to first token (first non-empty content delta); usage from
``stream_options.include_usage`` gives output tokens, and the ``diffusion`` extension (when the
server is dllm-serve) gives forwards. Prompts are the bundled held-out task prompts, so every run
of the same settings sends the same requests.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class LoadSettings:
    url: str
    concurrency: int = 8
    requests: int = 64
    max_tokens: int = 64
    model: str | None = None  # None: the server's first model
    algorithm: str | None = None
    temperature: float = 0.0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # more request fields (block_length ...)
    api_key: str | None = None
    timeout: float = 600.0
    progress: bool = True


@dataclass
class RequestStats:
    ok: bool
    latency_s: float
    ttft_s: float | None = None
    output_tokens: int = 0
    forwards: int = 0
    error: str | None = None


def api_base(url: str) -> str:
    """http://host:port, http://host:port/ or http://host:port/v1 -> http://host:port/v1."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _summary(values: list[float]) -> dict[str, float | None]:
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    return {
        "mean": r(sum(values) / len(values)) if values else None,
        "p50": r(percentile(values, 50)),
        "p99": r(percentile(values, 99)),
        "max": r(max(values)) if values else None,
    }


def _prompts(n: int) -> list[str]:
    from dllm_serve.bench.tasks import heldout_examples

    examples = heldout_examples(min(n, 1000))
    return [examples[i % len(examples)].prompt for i in range(n)]


async def _one(client: httpx.AsyncClient, body: dict[str, Any]) -> RequestStats:
    start = time.perf_counter()
    ttft = None
    usage = forwards = 0
    try:
        async with client.stream("POST", "/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return RequestStats(
                    False, time.perf_counter() - start, error=f"{resp.status_code}: {text[:200]}"
                )
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return RequestStats(False, time.perf_counter() - start, error=str(chunk["error"])[:200])
                for choice in chunk.get("choices") or []:
                    if ttft is None and (choice.get("delta") or {}).get("content"):
                        ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                    forwards = (chunk.get("diffusion") or {}).get("forwards") or 0
    except httpx.HTTPError as exc:
        return RequestStats(False, time.perf_counter() - start, error=type(exc).__name__)
    return RequestStats(True, time.perf_counter() - start, ttft, usage, forwards)


async def run_load(settings: LoadSettings) -> dict[str, Any]:
    """Run the load and return the report (JSON-ready)."""
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    limits = httpx.Limits(
        max_connections=settings.concurrency + 4, max_keepalive_connections=settings.concurrency
    )
    async with httpx.AsyncClient(
        base_url=api_base(settings.url), headers=headers, timeout=settings.timeout, limits=limits
    ) as client:
        model = settings.model
        if model is None:
            model = (await client.get("/models")).raise_for_status().json()["data"][0]["id"]
        prompts = _prompts(settings.requests)
        bodies = []
        for i, prompt in enumerate(prompts):
            body: dict[str, Any] = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": settings.max_tokens,
                "temperature": settings.temperature,
                "seed": settings.seed + i,
                "stream": True,
                "stream_options": {"include_usage": True},
                **settings.extra,
            }
            if settings.algorithm:
                body["algorithm"] = settings.algorithm
            bodies.append(body)

        results: list[RequestStats | None] = [None] * len(bodies)
        next_index = 0
        bar = None
        if settings.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(bodies), desc="requests", unit="req", leave=False)

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(bodies):
                i = next_index
                next_index += 1
                results[i] = await _one(client, bodies[i])
                if bar is not None:
                    bar.update(1)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(settings.concurrency)))
        duration = time.perf_counter() - start
        if bar is not None:
            bar.close()

    done = [r for r in results if r is not None]
    ok = [r for r in done if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    forwards = sum(r.forwards for r in ok)
    errors = sorted({r.error for r in done if not r.ok and r.error})
    return {
        "url": settings.url,
        "model": model,
        "algorithm": settings.algorithm,
        "concurrency": settings.concurrency,
        "requests": len(done),
        "completed": len(ok),
        "failed": len(done) - len(ok),
        "errors": errors[:5],
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "extra": settings.extra,
        "duration_s": round(duration, 3),
        "requests_per_s": round(len(ok) / duration, 4),
        "output_tokens": out_tokens,
        "output_tokens_per_s": round(out_tokens / duration, 2),
        "forwards": forwards,
        "tokens_per_forward": round(out_tokens / forwards, 4) if forwards else None,
        "ttft_s": _summary([r.ttft_s for r in ok if r.ttft_s is not None]),
        "latency_s": _summary([r.latency_s for r in ok]),
    }
