#!/usr/bin/env bash
# Every LLaDA preset on the bundled tiny-llada: 200 held-out prompts, 64-token canvas, batch 1 and 16.
# Writes one raw JSON per run to benchmarks/raw/ and the table to stdout.
#   OMP_NUM_THREADS=1 benchmarks/engines_cpu.sh      (results: benchmarks/engines_cpu.md)
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/raw
mkdir -p "$out"
for batch in 1 16; do
  for preset in llada prefix_cache dual_cache dinfer_blockwise dinfer_hierarchy dinfer_credit; do
    dllm-serve eval --algorithm "$preset" --limit 200 --gen-length 64 --max-batch-size "$batch" --json \
      > "$out/engines_cpu_${preset}_bs${batch}.json" 2>/dev/null
  done
done
python benchmarks/engines_table.py "$out"/engines_cpu_*.json
