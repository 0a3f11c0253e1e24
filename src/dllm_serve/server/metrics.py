"""Prometheus metrics of one server process, in a registry of its own (no module globals).

Per-request figures (tokens, latency, time to first token, tokens per forward) are recorded by the
routes when a choice ends; per-iteration figures (forwards, batch size) come from the engine's step
observers, which run on the engine thread (prometheus_client metrics are thread-safe).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "dllm_serve"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TPF_BUCKETS = (0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4, 6, 8, 12, 16, 32)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.waiting = Gauge(f"{PREFIX}_requests_waiting", "Requests queued for the engine.", registry=r)
        self.running = Gauge(f"{PREFIX}_requests_running", "Sequences in the running batch.", registry=r)
        self.finished = Counter(
            f"{PREFIX}_requests_finished",
            "Finished choices by finish reason (stop, length, abort, error, timeout).",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens", "Generated tokens returned (usage).", registry=r
        )
        self.forwards = Counter(f"{PREFIX}_forwards", "Model forwards run by the engine.", registry=r)
        self.iterations = Counter(f"{PREFIX}_iterations", "Engine iterations.", registry=r)
        self.tokens_per_forward = Histogram(
            f"{PREFIX}_tokens_per_forward",
            "Returned tokens per model forward, per finished choice.",
            buckets=_TPF_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From request arrival to its first returned token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "From request arrival to its last choice finishing.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size", "Sequences per engine iteration.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.iteration_seconds = Histogram(
            f"{PREFIX}_iteration_seconds",
            "Duration of one engine iteration.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.kv_capacity = Gauge(f"{PREFIX}_kv_cache_capacity_bytes", "KV-cache arena size.", registry=r)
        self.kv_used = Gauge(
            f"{PREFIX}_kv_cache_used_bytes", "KV-cache bytes held by running sequences.", registry=r
        )
        self.kv_peak = Gauge(
            f"{PREFIX}_kv_cache_peak_used_bytes", "Most KV-cache bytes held at once so far.", registry=r
        )
        # Prompt-cache reuse (block-causal models): counters mirrored from the engine's totals.
        self.prompt_cache_lookups = Counter(
            f"{PREFIX}_prompt_cache_lookups", "Requests that looked up the prompt cache.", registry=r
        )
        self.prompt_cache_hits = Counter(
            f"{PREFIX}_prompt_cache_hits",
            "Requests that reused at least one cached prompt block.",
            registry=r,
        )
        self.prompt_cache_reused_tokens = Counter(
            f"{PREFIX}_prompt_cache_reused_tokens",
            "Prompt tokens whose K/V came from the prompt cache instead of a forward.",
            registry=r,
        )
        self.prompt_cache_used = Gauge(
            f"{PREFIX}_prompt_cache_used_bytes", "Bytes held by cached prompt blocks.", registry=r
        )
        self.prompt_cache_capacity = Gauge(
            f"{PREFIX}_prompt_cache_capacity_bytes", "The prompt cache's budget.", registry=r
        )
        self._mirrored = {"lookups": 0, "hits": 0, "reused_tokens": 0}
        # Likelihood scoring (/v1/loglikelihood, completions echo + logprobs): its rows share the
        # engine's forwards with generation, so its own volume and latency are counted apart.
        self.scoring_requests = Counter(
            f"{PREFIX}_scoring_requests",
            "Scoring requests (one per context/continuation pair or echoed prompt) by outcome.",
            ["reason"],
            registry=r,
        )
        self.scoring_tokens = Counter(
            f"{PREFIX}_scoring_tokens", "Tokens whose log-probability was returned by scoring.", registry=r
        )
        self.scoring_latency = Histogram(
            f"{PREFIX}_scoring_latency_seconds",
            "From a scoring call's arrival to its last score.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.http_errors = Counter(
            f"{PREFIX}_request_errors", "Requests answered with an error, by status.", ["status"], registry=r
        )

    def observe_step(self, info) -> None:
        """Engine step observer (engine thread): one ``StepInfo`` per iteration."""
        self.iterations.inc()
        self.forwards.inc(info.forwards)
        self.batch_size.observe(info.batch_size)
        self.iteration_seconds.observe(info.duration_s)

    def observe_choice(self, reason: str, completion_tokens: int, forwards: int) -> None:
        self.finished.labels(reason=reason).inc()
        self.generation_tokens.inc(completion_tokens)
        if forwards > 0:
            self.tokens_per_forward.observe(completion_tokens / forwards)

    def observe_scoring(self, events, seconds: float) -> None:
        """One HTTP scoring call's engine events, once all of them arrived."""
        for event in events:
            self.scoring_requests.labels(reason=event.finish_reason).inc()
            self.scoring_tokens.inc(event.num_tokens or sum(t is not None for t in event.tokens))
        self.scoring_latency.observe(seconds)

    def render(self, engine) -> bytes:
        """The exposition text, with the queue gauges read from the engine now."""
        if engine is not None:
            stats = engine.stats()
            self.waiting.set(stats.waiting)
            self.running.set(stats.running)
            self.kv_capacity.set(stats.kv_capacity_tokens * stats.kv_bytes_per_token)
            self.kv_used.set(stats.kv_used_tokens * stats.kv_bytes_per_token)
            self.kv_peak.set(stats.kv_peak_used_tokens * stats.kv_bytes_per_token)
            self._mirror_prompt_cache(stats.prompt_cache)
        return generate_latest(self.registry)

    def _mirror_prompt_cache(self, pc) -> None:
        """Advance the counters to the engine's totals (renders run on the event loop, one at a time)."""
        counters = {
            "lookups": self.prompt_cache_lookups,
            "hits": self.prompt_cache_hits,
            "reused_tokens": self.prompt_cache_reused_tokens,
        }
        for name, counter in counters.items():
            total = getattr(pc, name)
            delta = total - self._mirrored[name]
            if delta > 0:
                self._mirrored[name] = total
                counter.inc(delta)
        self.prompt_cache_used.set(pc.used_bytes)
        self.prompt_cache_capacity.set(pc.budget_bytes)
