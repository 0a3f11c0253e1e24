#!/usr/bin/env bash
# End to end on a SLURM cluster: submit a server job, wait until it is ready, query it, stop it.
# Run it on a login node (compute nodes are reachable from there); from a laptop use the ssh tunnel
# that `dllm-serve slurm connect` prints.
#
#   MODEL=GSAI-ML/LLaDA-8B-Instruct ACCOUNT=my-account PARTITION=gpu GPUS_PER_NODE=1 \
#   DLLM_SERVE_API_KEY=sk-... examples/slurm_workflow.sh
#
# Settings (environment): MODEL (required: a model directory, or a hub id already in the HF cache of
# the compute nodes), ACCOUNT, PARTITION, GPUS_PER_NODE (default 1; 0 = CPU), CPUS_PER_TASK, MEM,
# TIME (default 01:00:00), READY_TIMEOUT (seconds, default 3600), SERVE_ARGS (more `dllm-serve serve`
# flags, space-separated), DLLM_SERVE_JOBS_DIR (where the job's script, log and info file go).
# Secrets travel in the environment only (DLLM_SERVE_API_KEY, HF_TOKEN): never on a command line.
set -euo pipefail
: "${MODEL:?set MODEL to the model to serve}"

submit=(dllm-serve slurm submit --json --time "${TIME:-01:00:00}" --gpus-per-node "${GPUS_PER_NODE:-1}")
[ -n "${ACCOUNT:-}" ] && submit+=(--account "$ACCOUNT")
[ -n "${PARTITION:-}" ] && submit+=(--partition "$PARTITION")
[ -n "${CPUS_PER_TASK:-}" ] && submit+=(--cpus-per-task "$CPUS_PER_TASK")
[ -n "${MEM:-}" ] && submit+=(--mem "$MEM")
read -r -a extra <<<"${SERVE_ARGS:-}"

# 1. Submit. The JSON answer names the job and its info file.
job=$("${submit[@]}" -- --model-path "$MODEL" "${extra[@]}")
job_id=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["job_id"])' "$job")
echo "submitted job $job_id"
# Whatever happens below, do not leave the job running.
trap 'dllm-serve slurm stop --job-id "$job_id"' EXIT

# 2. Wait until the server in the job answers /health (the job writes `ready` to its info file).
conn=$(dllm-serve slurm connect --job-id "$job_id" --timeout "${READY_TIMEOUT:-3600}" --json)
base_url=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["base_url"])' "$conn")
echo "ready at $base_url"
dllm-serve slurm status --job-id "$job_id"

# 3. Query it like any OpenAI endpoint.
model=$(curl -sf -H "Authorization: Bearer ${DLLM_SERVE_API_KEY:-unused}" "$base_url/models" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
curl -sf "$base_url/chat/completions" -H "Content-Type: application/json" \
  -H "Authorization: Bearer ${DLLM_SERVE_API_KEY:-unused}" -d @- <<JSON
{"model": "$model", "max_tokens": 32, "temperature": 0,
 "messages": [{"role": "user", "content": "Copy the list: s l u r m j o b s r u n f a s t"}]}
JSON
echo
# 4. Stop: the EXIT trap cancels the job and marks its info file `stopped`.
