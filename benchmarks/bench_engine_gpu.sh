#!/usr/bin/env bash
# The GPU engine benchmark of issue 10 in one command (one `device` call; about 5 minutes on an H100):
# LLaDA-8B-Instruct and Nemotron-Diffusion-Research-4B shapes with dummy bf16 weights, prompt 256,
# generation 256, block 32, one token per step (the targets' workload), eager and with CUDA graphs.
# Writes one raw JSON per run to benchmarks/raw/ and the markdown table to stdout:
#   benchmarks/bench_engine_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/raw
mkdir -p "$out"
gpu=$(python -c 'import torch; print(torch.cuda.get_device_name().split()[1].lower())')
common=(--load-format dummy --device cuda --prompt-len 256 --gen-length 256 --block-length 32
  --fixed-tokens-per-step 1 --no-progress --json)

run() {  # name, then bench engine arguments
  local name=$1
  shift
  echo "== $name" >&2
  dllm-serve bench engine "${common[@]}" "$@" -o "$out/engine_${gpu}_${name}.json" >/dev/null
}

for graphs in eager graphs; do
  flag=()
  [ "$graphs" = graphs ] && flag=(--cuda-graphs)
  for bs in 1 8 32; do
    run "llada-8b_dual_cache_bs${bs}_${graphs}" --model-path llada-8b-instruct --algorithm dual_cache \
      --batch-size "$bs" "${flag[@]}"
    run "nemotron-4b_nemotron_bs${bs}_${graphs}" --model-path nemotron-diffusion-research-4b \
      --algorithm nemotron --batch-size "$bs" "${flag[@]}"
  done
  run "llada-8b_dinfer_blockwise_bs32_${graphs}" --model-path llada-8b-instruct \
    --algorithm dinfer_blockwise --batch-size 32 "${flag[@]}"
done
# The reference sampler (full canvas every step, no cache) at batch 1, for scale.
run "llada-8b_llada_bs1_eager" --model-path llada-8b-instruct --algorithm llada --batch-size 1

python benchmarks/bench_engine_table.py "$out"/engine_"${gpu}"_*.json
