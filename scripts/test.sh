#!/usr/bin/env bash
# The project's test command (README and CI): installs the system packages the integration
# tests drive for real (SLURM daemons and munge; Chromium and its driver for the playground's
# browser tests) when they are missing, then runs pytest.
# Run it inside the project's virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || need+=(munge)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
if ((${#need[@]})); then
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  echo "installing ${need[*]} for the SLURM and browser tests"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
fi

exec python -m pytest "$@"
