#!/usr/bin/env bash
# A/B of the engine's per-step cost between two commits on the CPU: tiny-llada, dual_cache, batch 1
# and 16, K = 4, runs alternating between the commits (3 each) so machine drift hits both alike.
# Raw JSON per run goes to benchmarks/raw/ab_<commit>_bs<batch>_<run>.json; a median table to stdout:
#   OMP_NUM_THREADS=1 benchmarks/compare_commits_cpu.sh OLD_COMMIT NEW_COMMIT
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
out=benchmarks/raw
trees=$(mktemp -d)
trap 'for c in "$@"; do git worktree remove --force "$trees/$c" 2>/dev/null || true; done; rm -rf "$trees"' EXIT
for c in "$@"; do git worktree add -q --detach "$trees/$c" "$c"; done
for run in 1 2 3; do
  for bs in 1 16; do
    for c in "$@"; do
      PYTHONPATH="$trees/$c/src" python -m dllm_serve.cli bench engine --model-path models/tiny-llada \
        --device cpu --dtype float32 --fixed-tokens-per-step 4 --block-length 32 --no-progress --json \
        --algorithm dual_cache --batch-size "$bs" --prompt-len 64 --gen-length 128 \
        -o "$out/ab_${c}_bs${bs}_${run}.json" >/dev/null 2>&1
    done
  done
done
python - "$out" "$@" <<'PY'
import json, statistics, sys
from pathlib import Path
out, commits = Path(sys.argv[1]), sys.argv[2:]
print("| commit | batch | block step median ms (3 runs) | refresh step median ms | tokens/s |")
print("|---|---:|---|---|---:|")
for bs in (1, 16):
    for c in commits:
        runs = [json.loads((out / f"ab_{c}_bs{bs}_{r}.json").read_text())["results"] for r in (1, 2, 3)]
        block = [r["steps"]["block"]["median_ms"] for r in runs]
        refresh = [r["steps"]["refresh"]["median_ms"] for r in runs]
        tps = statistics.median(r["totals"]["tokens_per_s"] for r in runs)
        print(f"| {c} | {bs} | {statistics.median(block):.2f} ({', '.join(f'{b:.2f}' for b in block)}) | "
              f"{statistics.median(refresh):.1f} | {tps:.0f} |")
PY
