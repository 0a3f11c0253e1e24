"""What the server, the CLI and the benchmarks rely on in an engine, shared by the native ``Engine``
(engine/engine.py) and the remote-code ``RemoteEngine`` (engine/remote.py), so neither imports the
other: counters, offline results, the default preset and per-request parameter resolution.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dllm_serve.config import EngineConfig
from dllm_serve.engine.algorithms import DecodeParams, canonical_name, default_preset, resolve_params
from dllm_serve.engine.prompt_cache import PromptCacheStats
from dllm_serve.engine.runner import StepInfo
from dllm_serve.engine.scoring import AnyRequest as AnyScoringRequest
from dllm_serve.engine.scoring import ScoringEvent
from dllm_serve.engine.sequence import GenerationRequest, SequenceEvent
from dllm_serve.models import registry
from dllm_serve.models.loader import LoadedModel


@dataclass
class EngineStats:
    waiting: int
    running: int
    finished: int
    forwards: int
    steps: int
    # KV cache, in arena tokens (0 where the engine has none, e.g. remote code)
    kv_capacity_tokens: int = 0
    kv_used_tokens: int = 0
    kv_peak_used_tokens: int = 0
    kv_bytes_per_token: int = 0
    # Prompt-cache reuse (block-causal models; all zero otherwise)
    prompt_cache: PromptCacheStats = field(default_factory=PromptCacheStats)


@dataclass
class RequestResult:
    """A finished request's tokens, collected from its events (offline use)."""

    token_ids: list[int]
    finish_reason: str
    stopped_on_token: bool
    forwards: int
    error: str | None = None

    def add(self, event: SequenceEvent) -> None:
        """Fold one of the request's events in (tokens extend; the final event sets the rest)."""
        self.token_ids.extend(event.token_ids)
        if event.finished:
            self.finish_reason = event.finish_reason or ""
            self.stopped_on_token = event.stopped_on_token
            self.forwards = event.forwards
            self.error = event.error


class EngineBase:
    """What the server, the CLI and the benchmarks rely on, shared by the native ``Engine`` and the
    remote-code ``RemoteEngine``: the loaded model, the default preset, per-request parameter
    resolution, step observers, counters and the worker thread. Each implements ``_loop`` (the
    thread's body, which returns once ``_stop`` is set), ``add_request``, ``abort``, ``stats``,
    ``shutdown`` and ``run_to_completion``."""

    thread_name = "dllm-engine"
    traces_denoise = False  # can stream each step's provisional state (stream_mode "denoise")
    # Likelihood scoring and token log-probabilities (the native engine; remote code has neither).
    supports_logprobs = False
    stop_ids: tuple[int, ...] = ()  # the token ids that end a generation (eos, end of turn)

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.loaded = loaded
        family = loaded.family
        self.default_algorithm = (
            canonical_name(self.config.algorithm, family)
            if self.config.algorithm
            else default_preset(self.config.engine, family)
        )
        # Block-causal attention (models/family.py): likelihoods use the block-diffusion estimator.
        self.block_diffusion = registry.get(family).attention in (
            "block_causal",
            "aligned_block_causal",
            "block_aligned",
        )
        # Blocks at absolute positions over prompt and answer (SDAR, LLaDA2): the estimator's layout too.
        self.aligned_scoring = registry.get(family).attention in ("aligned_block_causal", "block_aligned")
        # Causal (Nemotron-Labs, trained autoregressively too): the exact autoregressive likelihood.
        self.causal_scoring = registry.get(family).attention == "causal"
        # Decoding defaults the checkpoint implies (e.g. Nemotron's block_size -> block_length).
        self.model_defaults: dict[str, Any] = dict(loaded.decode_defaults)
        self.step_observers: list[Callable[[StepInfo], None]] = []
        self.forwards = 0
        self.steps = 0
        self.finished = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._draining = False
        self.failure: str | None = None  # why the engine stopped for good (/health says "failed")

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.is_running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        raise NotImplementedError

    # -- what each engine implements (the server's and the CLI's seam) -------------------------

    def add_request(self, request: GenerationRequest, on_event: Callable[[SequenceEvent], None]) -> None:
        """Queue a request (any thread); ``on_event`` gets its events. ``QueueFullError`` when full."""
        raise NotImplementedError

    def add_scoring(self, request: AnyScoringRequest, on_event: Callable[[ScoringEvent], None]) -> None:
        """Queue a likelihood scoring request; only engines with ``supports_logprobs`` have one."""
        raise NotImplementedError("likelihood scoring needs the native engine")

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    def stats(self) -> EngineStats:
        raise NotImplementedError

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        raise NotImplementedError

    def run_to_completion(self, requests: Iterable[GenerationRequest]) -> dict[str, RequestResult]:
        raise NotImplementedError

    def resolve_params(
        self, max_new_tokens: int, overrides: dict[str, Any] | None = None, algorithm: str | None = None
    ) -> DecodeParams:
        """A request's decoding parameters for the loaded model (raises ``ParamError``).

        Precedence: request overrides > the checkpoint's defaults > the preset's defaults;
        ``algorithm`` None means the engine's default preset.
        """
        return resolve_params(
            algorithm or self.default_algorithm,
            self.loaded.family,
            max_new_tokens,
            overrides,
            model_defaults=self.model_defaults,
        )
