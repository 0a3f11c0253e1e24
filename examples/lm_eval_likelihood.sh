#!/usr/bin/env bash
# A likelihood (multiple-choice) evaluation with lm-eval through dllm-serve's own model class, which
# scores each choice with the server's Monte-Carlo ELBO endpoint (/v1/loglikelihood) and sends many
# requests at once (`pip install 'dllm-serve[eval]'`; docs/evaluation.md).
#
#   DLLM_SERVE_URL=http://127.0.0.1:8000/v1 examples/lm_eval_likelihood.sh [more lm_eval flags]
#
# By default it runs `dllm_mc`, a local 4-way multiple-choice task built from the bundled task set
# (the right answer among three wrong ones), against the bundled model. For a real model use real
# tasks and the model's tokenizer, e.g. TASKS=arc_easy,hellaswag TOKENIZER=GSAI-ML/LLaDA-8B-Base
# MC_NUM=128 (lm-eval then downloads the data sets, so run it where the hub is reachable).
# The API key, if the server has one, is read from DLLM_SERVE_API_KEY.
set -euo pipefail
cd "$(dirname "$0")/.."
url=${DLLM_SERVE_URL:-http://127.0.0.1:8000/v1}
tasks=${TASKS:-dllm_mc}
local=()
[ "$tasks" = dllm_mc ] && local=(--local-tasks)

dllm-serve lm-eval --base-url "${url%/v1}" --tasks "$tasks" "${local[@]}" \
  --model-args "mc_num=${MC_NUM:-16},tokenizer=${TOKENIZER:-models/tiny-llada},num_concurrent=4" \
  -- --apply_chat_template --limit "${LIMIT:-24}" "$@"
