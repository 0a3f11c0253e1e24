"""An lm-eval model ("dllm-serve") that evaluates through a running dllm-serve server.

* ``loglikelihood``: ``POST /v1/loglikelihood`` (the ELBO estimator of docs/evaluation.md), items
  sent in batches of ``batch_items`` over ``num_concurrent`` concurrent HTTP calls, all with the
  same ``seed`` (candidates of one question share random numbers);
* ``loglikelihood_rolling`` (perplexity tasks): the unconditional ELBO (empty context) of each
  window of at most ``max_length`` tokens, summed (windows need ``tokenizer``; without it the
  document is one window);
* ``generate_until``: ``/v1/completions`` (lm-eval renders the chat template itself when run with
  ``--apply_chat_template``), with the diffusion parameters given as model args.

Model args (``--model_args k=v,...``): ``base_url`` (required, e.g. http://127.0.0.1:8000),
``model`` (default: the server's), ``mc_num`` (128), ``cfg_scale`` (0), ``seed`` (1234),
``check_greedy`` (false), ``block_length`` (block-diffusion estimator), ``batch_items`` (16),
``num_concurrent`` (4), ``tokenizer`` (path or Hugging Face name: chat templates and windows),
``max_length``, ``api_key`` (default: $DLLM_SERVE_API_KEY; prefer the variable, a model arg shows on
the command line), ``timeout`` (600 s), and for generation ``algorithm``, ``steps``,
``gen_block_length``, ``threshold``, ``temperature`` (0), ``max_gen_toks`` (256).

Importing this module registers the model with lm-eval (an optional dependency:
``pip install 'dllm-serve[eval]'``).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import httpx
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

RETRY_STATUS = (429, 503)


@register_model("dllm-serve")
class DllmServeLM(LM):
    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        mc_num: int = 128,
        cfg_scale: float = 0.0,
        seed: int = 1234,
        check_greedy: bool = False,
        block_length: int | None = None,
        batch_items: int = 16,
        num_concurrent: int = 4,
        tokenizer: str | None = None,
        max_length: int | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        algorithm: str | None = None,
        steps: int | None = None,
        gen_block_length: int | None = None,
        threshold: float | None = None,
        temperature: float = 0.0,
        max_gen_toks: int = 256,
        **_: Any,  # lm-eval passes batch_size, device ... which do not apply to a server
    ) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        api_key = api_key or os.environ.get("DLLM_SERVE_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.model = model or self._get("/v1/models")["data"][0]["id"]
        self.scoring = {"mc_num": int(mc_num), "cfg_scale": float(cfg_scale), "seed": int(seed)}
        self.scoring["check_greedy"] = bool(check_greedy)
        if block_length is not None:
            self.scoring["block_length"] = int(block_length)
        self.batch_items = int(batch_items)
        self.num_concurrent = int(num_concurrent)
        self.max_length = int(max_length) if max_length else None
        self.generation = {
            k: v
            for k, v in {
                "algorithm": algorithm,
                "steps": steps,
                "block_length": gen_block_length,
                "threshold": threshold,
                "temperature": float(temperature),
            }.items()
            if v is not None
        }
        self.max_gen_toks = int(max_gen_toks)
        self.tokenizer = None
        if tokenizer:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
            self._tokenizer_name = tokenizer

    # -- HTTP ---------------------------------------------------------------------------------

    def _get(self, path: str) -> dict[str, Any]:
        r = self.http.get(path)
        r.raise_for_status()
        return r.json()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries while the server's queue is full."""
        for attempt in range(30):
            r = self.http.post(path, json=body)
            if r.status_code not in RETRY_STATUS:
                break
            time.sleep(min(10.0, 0.5 * 2**attempt))
        if r.status_code != 200:
            raise RuntimeError(f"{path}: HTTP {r.status_code}: {r.text}")
        return r.json()

    def _score(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Score items in batches over concurrent calls; results in the items' order."""
        batches = [items[i : i + self.batch_items] for i in range(0, len(items), self.batch_items)]

        def call(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
            body = {"model": self.model, "requests": batch, **self.scoring}
            return self._post("/v1/loglikelihood", body)["data"]

        with ThreadPoolExecutor(max(1, self.num_concurrent)) as pool:
            return [row for rows in pool.map(call, batches) for row in rows]

    # -- lm-eval interface --------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        items = [
            {"context": context, "continuation": continuation}
            for context, continuation in (r.args for r in requests)
        ]
        return [(row["logprob"], bool(row["is_greedy"])) for row in self._score(items)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        items, owners = [], []
        for k, request in enumerate(requests):
            for window in self._windows(request.args[0]):
                items.append({"context": [] if isinstance(window, list) else "", "continuation": window})
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, row in zip(owners, self._score(items), strict=True):
            totals[k] += row["logprob"]
        return totals

    def _windows(self, text: str) -> list[str | list[int]]:
        """The document as token windows of at most ``max_length`` (or as one text)."""
        if self.tokenizer is None or self.max_length is None:
            return [text]
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return [ids[i : i + self.max_length] for i in range(0, len(ids), self.max_length)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        def one(request) -> str:
            context, kwargs = request.args
            kwargs = dict(kwargs)
            until = kwargs.pop("until", None) or []
            body = {
                "model": self.model,
                "prompt": context,
                "max_tokens": int(kwargs.pop("max_gen_toks", self.max_gen_toks)),
                "stop": ([until] if isinstance(until, str) else list(until))[:4] or None,
                **self.generation,
            }
            if "temperature" in kwargs:
                body["temperature"] = float(kwargs["temperature"])
            return self._post("/v1/completions", body)["choices"][0]["text"]

        with ThreadPoolExecutor(max(1, self.num_concurrent)) as pool:
            return list(pool.map(one, requests))

    # -- chat templates (lm-eval's --apply_chat_template; needs ``tokenizer``) ------------------

    @property
    def tokenizer_name(self) -> str:
        return getattr(self, "_tokenizer_name", self.model)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if self.tokenizer is None:
            raise ValueError("--apply_chat_template needs the model arg tokenizer=<path or name>")
        text = self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return cast(str, text)  # tokenize=False: the rendered text
