#!/usr/bin/env bash
# `dllm-serve bench engine` figures on the CPU: the bundled tiny-llada (its trained weights), and
# dummy-weight LLaDA-8B / Nemotron-4B shapes cut to 2 layers at full width. One thread, K = 4.
# Writes one raw JSON per run to benchmarks/raw/ and the markdown table to stdout:
#   OMP_NUM_THREADS=1 benchmarks/bench_engine_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
out=benchmarks/raw
mkdir -p "$out"
common=(--device cpu --dtype float32 --fixed-tokens-per-step 4 --block-length 32 --no-progress --json)

for batch in 1 16; do
  for preset in llada dual_cache dinfer_blockwise; do
    dllm-serve bench engine "${common[@]}" --algorithm "$preset" --batch-size "$batch" \
      --prompt-len 64 --gen-length 128 -o "$out/engine_cpu_tiny-llada_${preset}_bs${batch}.json" >/dev/null
  done
done

dllm-serve bench engine "${common[@]}" --model-path llada-8b-instruct --load-format dummy \
  --config-override n_layers=2 --algorithm dual_cache --batch-size 1 --prompt-len 64 --gen-length 64 \
  -o "$out/engine_cpu_llada-8b-2layers_dual_cache_bs1.json" >/dev/null

dllm-serve bench engine "${common[@]}" --model-path nemotron-diffusion-research-4b --load-format dummy \
  --config-override num_hidden_layers=2 --algorithm nemotron --batch-size 1 --prompt-len 64 --gen-length 64 \
  -o "$out/engine_cpu_nemotron-4b-2layers_nemotron_bs1.json" >/dev/null

python benchmarks/bench_engine_table.py "$out"/engine_cpu_*.json
