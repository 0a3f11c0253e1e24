"""The engine API over a checkpoint's own ``generate`` (``--trust-remote-code``).

A remote ``generate`` owns its whole decoding loop, so nothing can be batched or streamed: each
request is one call, made on this engine's worker thread (never on the asyncio event loop), one
request at a time, in arrival order. Its tokens arrive as the request's single final event, with
``forwards`` = the nfe the call reported. A waiting request can be aborted; a running call cannot
be interrupted, so an aborted one's result is dropped when it returns.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from dllm_serve.config import EngineConfig
from dllm_serve.engine.algorithms import DecodeParams
from dllm_serve.engine.base import EngineBase, EngineStats, RequestResult
from dllm_serve.engine.runner import StepInfo
from dllm_serve.engine.scheduler import QueueFullError
from dllm_serve.engine.sequence import GenerationRequest, SequenceEvent
from dllm_serve.models.loader import LoadedModel, RemoteModel

log = logging.getLogger(__name__)

OnEvent = Callable[[SequenceEvent], None]
# DecodeParams fields offered to a remote generate() under these names (filtered by its signature).
CORE_KWARGS = ("max_new_tokens", "steps", "block_length", "threshold", "shift_logits", "temperature")


class RemoteEngine(EngineBase):
    thread_name = "dllm-remote-engine"

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        if not isinstance(loaded.model, RemoteModel):
            raise TypeError("RemoteEngine serves models loaded by remote_code.load_remote_model")
        super().__init__(loaded, config)
        self.model: RemoteModel = loaded.model
        self.stop_ids = self.model.stop_ids
        self._cond = threading.Condition()
        self._waiting: deque[tuple[GenerationRequest, OnEvent]] = deque()
        self._aborted: set[str] = set()
        self._running: str | None = None

    # -- any thread -------------------------------------------------------------------------

    def add_request(self, request: GenerationRequest, on_event: OnEvent) -> None:
        """Queue a request; ``on_event`` gets its one final event on the worker thread."""
        with self._cond:
            if self._draining:
                raise QueueFullError("the server is shutting down")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append((request, on_event))
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        """A waiting request ends with "abort" unrun; a running one's result is dropped."""
        with self._cond:
            if self._running == request_id or any(r.request_id == request_id for r, _ in self._waiting):
                self._aborted.add(request_id)

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(
                len(self._waiting), int(self._running is not None), self.finished, self.forwards, self.steps
            )

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Refuse new work, let queued calls finish (up to the timeout), abort the rest."""
        with self._cond:
            self._draining = True
        deadline = time.monotonic() + drain_timeout
        while self.is_running and time.monotonic() < deadline:
            with self._cond:
                if not self._waiting and self._running is None:
                    break
            time.sleep(0.01)
        with self._cond:
            self._stop.set()
            left = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for request, on_event in left:
            on_event(SequenceEvent(request.request_id, [], "abort", prompt_tokens=len(request.prompt_ids)))
        if self._thread is not None:
            self._thread.join(timeout=10)  # a call still running is left to its daemon thread

    # -- worker thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                request, on_event = self._waiting.popleft()
                self._running = request.request_id
            try:
                event = self._run(request)
            finally:
                with self._cond:
                    self._running = None
                    self._aborted.discard(request.request_id)
            try:
                on_event(event)
            except Exception:  # a listener's bug must not stop the engine
                log.exception("event callback failed for request %s", request.request_id)

    def _run(self, request: GenerationRequest) -> SequenceEvent:
        """One call of the model's own generate, as the request's final event."""
        rid, prompt_tokens = request.request_id, len(request.prompt_ids)
        if rid in self._aborted:
            return SequenceEvent(rid, [], "abort", prompt_tokens=prompt_tokens)
        start = time.perf_counter()
        try:
            ids, nfe = generate_remote(self.model, request.prompt_ids, request.params, request.max_new_tokens)
        except Exception:
            log.exception("the checkpoint's generate() failed on request %s", rid)
            return SequenceEvent(rid, [], "error", error="the model's own generate() failed")
        self.forwards += nfe
        self.steps += 1
        self.finished += 1
        info = StepInfo(1, nfe, 0, len(ids), 1, time.perf_counter() - start)
        for observer in self.step_observers:
            observer(info)
        if rid in self._aborted:
            return SequenceEvent(rid, [], "abort", forwards=nfe, prompt_tokens=prompt_tokens)
        stopped = bool(ids) and ids[-1] in self.model.stop_ids
        # Shorter than asked without a stop token: generate ended the answer itself.
        reason = "stop" if stopped or len(ids) < request.max_new_tokens else "length"
        tokens = ids[:-1] if stopped else ids
        return SequenceEvent(rid, tokens, reason, stopped, forwards=nfe, prompt_tokens=prompt_tokens)

    # -- offline ------------------------------------------------------------------------------

    def run_to_completion(self, requests: Iterable[GenerationRequest]) -> dict[str, RequestResult]:
        """Run requests one after another on the caller's thread (CLI generate/eval, tests)."""
        if self.is_running:
            raise RuntimeError("run_to_completion needs the worker thread to be stopped")
        results: dict[str, RequestResult] = {}
        for request in requests:
            result = results[request.request_id] = RequestResult([], "", False, 0)
            result.add(self._run(request))
        return results


# -- the call of a checkpoint's own generate() --------------------------------------------------


def generate_kwargs(
    fn: Callable[..., Any], params: DecodeParams, max_new_tokens: int, eos_token_id: int | None = None
) -> dict[str, Any]:
    """The decoding arguments ``fn`` accepts, by name; a ``**kwargs`` generate gets the core set only."""
    offered: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "gen_length": params.gen_length,
        "steps": params.steps,
        "block_length": params.block_length,
        "block_size": params.block_length,
        "threshold": params.threshold,
        "shift_logits": params.shift_logits,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "remasking": params.remasking,
        "factor": params.factor,
        "cfg_scale": params.cfg_scale,
    }
    if eos_token_id is not None:
        offered["eos_token_id"] = eos_token_id
    if params.editing_threshold is not None:  # LLaDA2.1's generate (no editing: it is not offered)
        offered["editing_threshold"] = params.editing_threshold
        offered["max_post_steps"] = params.max_post_steps
    sig = inspect.signature(fn)
    named = {
        n
        for n, p in sig.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return {k: v for k, v in offered.items() if k in named or (takes_any and k in CORE_KWARGS)}


def _count_forwards(module: nn.Module) -> tuple[list[int], Callable[[], None]]:
    """Count forwards by the input embedding's calls (one per forward however generate calls it)."""
    counter = [0]
    get_embeddings = getattr(module, "get_input_embeddings", None)
    embed = get_embeddings() if callable(get_embeddings) else None
    target = embed if isinstance(embed, nn.Module) else module

    def hook(*_: Any) -> None:
        counter[0] += 1

    handle = target.register_forward_pre_hook(hook)
    return counter, handle.remove


def sampler_entry(module: Any) -> Callable[..., Any]:
    """The checkpoint's diffusion sampler: ``diffusion_generate`` where its code has one (Dream's
    published code names it so; its ``generate`` is transformers' autoregressive loop), else
    ``generate``."""
    entry = getattr(module, "diffusion_generate", None)
    return entry if callable(entry) else module.generate


@torch.inference_mode()
def generate_remote(
    model: RemoteModel, prompt_ids: Sequence[int], params: DecodeParams, max_new_tokens: int
) -> tuple[list[int], int]:
    """One request through the model's own ``generate``: (new token ids, forwards used).

    The tokens are cut after the first stop token (kept, so the caller can tell a stop from a
    length finish) and at ``max_new_tokens``. The forward count is what ``generate`` reports as
    its nfe, or else the forwards counted while it ran.
    """
    module = model.module
    device = next(module.parameters()).device
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    entry = sampler_entry(module)
    kwargs = generate_kwargs(entry, params, max_new_tokens, model.eos_token_id)
    if params.seed is not None:
        torch.manual_seed(params.seed)
    counter, remove = _count_forwards(module)
    try:
        out = entry(prompt, **kwargs)
    finally:
        remove()
    out = getattr(out, "sequences", out)  # a ModelOutput (Dream's return_dict_in_generate)
    nfe = counter[0]
    if isinstance(out, tuple):
        out, reported = out[0], out[1]
        nfe = int(reported) if reported is not None else nfe
    if isinstance(out, torch.Tensor):
        ids = (out[0] if out.dim() == 2 else out).tolist()
    else:
        ids = list(out[0]) if out and isinstance(out[0], (list, tuple)) else list(out)
    if ids[: len(prompt_ids)] == list(prompt_ids):
        ids = ids[len(prompt_ids) :]
    ids = ids[:max_new_tokens]
    stops = set(model.stop_ids)
    cut = next((i for i, t in enumerate(ids) if t in stops), None)
    if cut is not None:
        ids = ids[: cut + 1]
    return ids, nfe
