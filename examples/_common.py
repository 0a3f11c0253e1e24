"""Where the examples find the server: environment variables with defaults for a local `dllm-serve serve`.

DLLM_SERVE_URL      base URL of the OpenAI API (default http://127.0.0.1:8000/v1)
DLLM_SERVE_API_KEY  the server's --api-key, if it has one (default "unused": a server without a key
                    ignores it, the openai client insists on some value)
DLLM_SERVE_MODEL    model name (default: the first one GET /v1/models lists)
"""

from __future__ import annotations

import os

from openai import OpenAI

BASE_URL = os.environ.get("DLLM_SERVE_URL", "http://127.0.0.1:8000/v1")
API_KEY = os.environ.get("DLLM_SERVE_API_KEY", "unused")


def client() -> OpenAI:
    return OpenAI(base_url=BASE_URL, api_key=API_KEY)


def model_name(c: OpenAI) -> str:
    return os.environ.get("DLLM_SERVE_MODEL") or c.models.list().data[0].id
