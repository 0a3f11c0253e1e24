#!/usr/bin/env bash
# Serve a training run's torch.distributed.checkpoint (DCP) directory, e.g. a NeMo-RL step, query it
# once and stop. The first start converts the checkpoint to safetensors and caches the result; later
# starts reuse the cache (docs/checkpoints.md).
#
#   DCP_PATH=results/llada-grpo/step_200 BASE_MODEL=GSAI-ML/LLaDA-8B-Instruct examples/serve_dcp.sh
#
# Settings (environment): DCP_PATH and BASE_MODEL (required; the base model supplies config.json,
# the tokenizer and the weight names), PORT (default 8000), DCP_CACHE_DIR (default: dllm-serve's),
# SERVE_ARGS (more `dllm-serve serve` flags).
set -euo pipefail
: "${DCP_PATH:?set DCP_PATH to the checkpoint directory}" "${BASE_MODEL:?set BASE_MODEL}"
port=${PORT:-8000}
flags=(--dcp-path "$DCP_PATH" --base-model "$BASE_MODEL" --host 127.0.0.1 --port "$port")
[ -n "${DCP_CACHE_DIR:-}" ] && flags+=(--dcp-cache-dir "$DCP_CACHE_DIR")
read -r -a extra <<<"${SERVE_ARGS:-}"

# Converting ahead of time (say, on a login node) fills the same cache the server reads.
convert=(dllm-serve convert-dcp "$DCP_PATH" --base-model "$BASE_MODEL")
[ -n "${DCP_CACHE_DIR:-}" ] && convert+=(--dcp-cache-dir "$DCP_CACHE_DIR")
"${convert[@]}"

dllm-serve serve "${flags[@]}" "${extra[@]}" &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 600); do # wait for /health: 200 once the model is loaded
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 "$server" 2>/dev/null || { echo "the server exited" >&2; exit 1; }
  sleep 1
done

model=$(curl -sf "http://127.0.0.1:$port/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H "Content-Type: application/json" -d @- <<JSON
{"model": "$model", "max_tokens": 32, "temperature": 0,
 "messages": [{"role": "user", "content": "Copy the list: c h e c k p o i n t s e r v e d"}]}
JSON
echo
