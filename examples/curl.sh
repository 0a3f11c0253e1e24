#!/usr/bin/env bash
# The HTTP API with curl alone: list models, one chat request with diffusion knobs, one streamed.
#   DLLM_SERVE_URL (default http://127.0.0.1:8000/v1), DLLM_SERVE_API_KEY (optional)
set -euo pipefail
url=${DLLM_SERVE_URL:-http://127.0.0.1:8000/v1}
auth=(-H "Authorization: Bearer ${DLLM_SERVE_API_KEY:-unused}")

model=$(curl -sf "${auth[@]}" "$url/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
echo "model: $model"

# Diffusion parameters are top-level fields next to the OpenAI ones.
curl -sf "${auth[@]}" "$url/chat/completions" -H "Content-Type: application/json" -d @- <<JSON
{"model": "$model", "max_tokens": 32,
 "messages": [{"role": "user", "content": "Upper-case the list: c u r l i s h e r e o k a y"}],
 "algorithm": "dinfer_blockwise", "threshold": 0.9}
JSON
echo

# Streaming: server-sent events, one JSON chunk per data: line, ending with data: [DONE].
curl -sfN "${auth[@]}" "$url/chat/completions" -H "Content-Type: application/json" -d @- <<JSON
{"model": "$model", "max_tokens": 32, "stream": true,
 "messages": [{"role": "user", "content": "Copy the list: s t r e a m e d t o k e n s o k"}]}
JSON
