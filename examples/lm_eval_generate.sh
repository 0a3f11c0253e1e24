#!/usr/bin/env bash
# Run an lm-eval generation task against a running server through lm-eval's own OpenAI-compatible
# chat client (`pip install lm-eval`). The task is a local one built from the bundled task set
# (examples/lm_eval/); swap in any lm-eval generation task (gsm8k, ...) for a real model.
#
#   DLLM_SERVE_URL=http://127.0.0.1:8000/v1 examples/lm_eval_generate.sh [more lm_eval flags]
set -euo pipefail
cd "$(dirname "$0")/.."
url=${DLLM_SERVE_URL:-http://127.0.0.1:8000/v1}
model=${DLLM_SERVE_MODEL:-$(curl -sf -H "Authorization: Bearer ${DLLM_SERVE_API_KEY:-unused}" "$url/models" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')}
# lm-eval's API clients read the key from OPENAI_API_KEY; the task data is local, so no hub access.
export OPENAI_API_KEY=${DLLM_SERVE_API_KEY:-unused} HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1

lm_eval --model local-chat-completions \
  --model_args "model=$model,base_url=$url/chat/completions,num_concurrent=4,max_retries=1,tokenized_requests=False" \
  --apply_chat_template --include_path examples/lm_eval --tasks dllm_tiny_tasks "$@"
