#!/usr/bin/env bash
# Likelihood scoring throughput on the CPU (benchmarks/scoring_cpu.md): both tiny models,
# 32 one-item requests, mc_num 128, concurrency 1 and 16, 3 alternating repeats; then one-token answers.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
for model in tiny-llada tiny-nemotron; do
    python benchmarks/bench_scoring.py --model-path "models/$model" --requests 32 --mc-num 128 --repeats 3 \
        --out "benchmarks/raw/scoring_cpu_$model.json"
done
# One-token answers (MMLU-style): one row per request, so concurrent requests fill the forwards.
python benchmarks/bench_scoring.py --model-path models/tiny-llada --requests 64 --mc-num 128 --repeats 3 \
    --answer-tokens 1 --out benchmarks/raw/scoring_cpu_tiny-llada_1token.json
