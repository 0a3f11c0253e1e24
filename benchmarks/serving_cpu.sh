#!/usr/bin/env bash
# Serving benchmark on the CPU: 32 concurrent clients (`dllm-serve bench serve`) against
# `dllm-serve serve` on tiny-llada, continuous batching (--max-batch-size 32) vs one sequence at a
# time (--max-batch-size 1). Same requests in both arms (held-out task prompts, seed + i, greedy).
#   short:   dual_cache, one token per step (rule schedule), block_length 8, max_tokens 24, 256 requests:
#            many small cached forwards per request, where batching pays on a CPU
#   default: the server's default preset (dinfer_blockwise), block_length 32, max_tokens 64, 64 requests
#   reference: the llada preset (one token per step), max_tokens 32, 128 requests
# Raw JSON reports go to benchmarks/raw/serving_cpu_<workload>_<arm>.json.
#   OMP_NUM_THREADS=1 benchmarks/serving_cpu.sh   # MODEL=... PORT=... WORKLOADS=...; results: serving_cpu.md
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
model=${MODEL:-models/tiny-llada}
port=${PORT:-8931}

bench() {  # workload arm max_batch_size requests, then bench flags
  local workload=$1 arm=$2 batch=$3 requests=$4; shift 4
  dllm-serve serve --port "$port" --model-path "$model" --max-batch-size "$batch" \
    > "/tmp/serving_cpu_${workload}_${arm}.server.log" 2>&1 &
  local pid=$!
  until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
    kill -0 "$pid" 2> /dev/null || { echo "server failed to start" >&2; exit 1; }
    sleep 0.5
  done
  dllm-serve bench serve --url "http://127.0.0.1:$port" --concurrency 32 --requests "$requests" --quiet \
    --json-out "benchmarks/raw/serving_cpu_${workload}_${arm}.json" "$@" > /dev/null
  kill -TERM "$pid"; wait "$pid" || true
}

workloads=${WORKLOADS:-short default reference}
for arm in continuous:32 batch1:1; do
  if [[ " $workloads " == *" short "* ]]; then
    bench short "${arm%%:*}" "${arm##*:}" 256 --algorithm dual_cache --max-tokens 24 \
      --extra '{"block_length": 8, "rule": "schedule"}'
  fi
  if [[ " $workloads " == *" default "* ]]; then
    bench default "${arm%%:*}" "${arm##*:}" 64 --max-tokens 64
  fi
  if [[ " $workloads " == *" reference "* ]]; then
    bench reference "${arm%%:*}" "${arm##*:}" 128 --algorithm llada --max-tokens 32
  fi
done

python - <<'PY'
import json
import os
for w in ("short", "default", "reference"):
    if not os.path.exists(f"benchmarks/raw/serving_cpu_{w}_continuous.json"):
        continue
    c = json.load(open(f"benchmarks/raw/serving_cpu_{w}_continuous.json"))
    b = json.load(open(f"benchmarks/raw/serving_cpu_{w}_batch1.json"))
    print(f"{w}: continuous {c['requests_per_s']:.2f} req/s, batch-1 {b['requests_per_s']:.2f} req/s: "
          f"{c['requests_per_s'] / b['requests_per_s']:.2f}x")
PY
