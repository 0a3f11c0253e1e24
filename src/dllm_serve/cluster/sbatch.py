"""The sbatch script a `dllm-serve slurm submit` renders.

One script for every shape of job. On one node with at most one GPU it runs a single in-process
server. With more GPUs or nodes (or ``--ray``) it starts a Ray head on the first node and a Ray
worker on every other node (one ``srun`` step each), then the server on the head with
``--ray-address`` and one replica per GPU. With ``--container-image`` every piece runs as an
``srun`` step inside the container (pyxis/enroot). The script records the pid of everything it
starts in the background and stops exactly those when the server ends or the job is cancelled.
Only non-secret settings are written here; HF_TOKEN and DLLM_SERVE_API_KEY reach the job through
its inherited environment (--export=ALL), and the Ray cluster token is made up inside the job.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field


@dataclass
class JobSpec:
    """Everything the script needs; the submit flags map onto it one to one."""

    output_dir: str
    python: str
    job_name: str = "dllm-serve"
    account: str | None = None
    partition: str | None = None
    time: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem: str | None = None
    container_image: str | None = None
    container_mounts: str | None = None
    force_ray: bool = False
    ready_timeout: float = 3600.0
    extra_sbatch: list[str] = field(default_factory=list)
    serve_args: list[str] = field(default_factory=list)


def _directives(spec: JobSpec) -> list[str]:
    d = [
        f"--job-name={spec.job_name}",
        f"--nodes={spec.nodes}",
        "--ntasks-per-node=1",
        f"--output={spec.output_dir}/%x-%j.log",
        "--export=ALL",
    ]
    optional = {
        "account": spec.account,
        "partition": spec.partition,
        "time": spec.time,
        "cpus-per-task": spec.cpus_per_task,
        "mem": spec.mem,
        "gpus-per-node": spec.gpus_per_node or None,
    }
    d += [f"--{k}={v}" for k, v in optional.items() if v is not None]
    d += spec.extra_sbatch
    return [f"#SBATCH {shlex.quote(x)}" for x in d]


def _array(words: list[str]) -> str:
    return "(" + " ".join(shlex.quote(w) for w in words) + ")"


_BODY = r"""
set -uo pipefail

INFO_FILE="$OUTPUT_DIR/dllm-serve-$SLURM_JOB_ID.json"
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD_NODE=${NODES[0]}
NUM_NODES=${#NODES[@]}
TOTAL_GPUS=$((GPUS_PER_NODE * NUM_NODES))
CPUS=${SLURM_CPUS_PER_TASK:-$(nproc)}

# Background launches record their pids so the job stops exactly what it started: the server
# first (it deletes its Serve application gracefully), then the Ray nodes.
SERVER_PIDS=()
RAY_PIDS=()
# Run "$@" in the background on node $1, inside the container when an image is given.
launch() {
  local node=$1
  shift
  if ((${#CONTAINER_ARGS[@]})) || [ "$node" != "$HEAD_NODE" ]; then
    srun --nodes=1 --ntasks=1 --overlap -w "$node" "${CONTAINER_ARGS[@]}" "$@" &
  else
    "$@" &
  fi
  LAUNCHED=$!
}
# SIGTERM to the given pids, SIGKILL to what is left after $1 seconds.
stop_all() {
  local grace=$1
  shift
  (($#)) || return 0
  kill "$@" 2>/dev/null
  (sleep "$grace" && kill -9 "$@" 2>/dev/null) &
  local watchdog=$!
  wait "$@" 2>/dev/null
  kill "$watchdog" 2>/dev/null
}
cleanup() {
  trap - EXIT TERM INT
  stop_all 60 "${SERVER_PIDS[@]}"
  stop_all 20 "${RAY_PIDS[@]}"
}
trap cleanup EXIT
trap 'cleanup; exit 143' TERM INT

ENTRY_ARGS=(--info-file "$INFO_FILE" --total-gpus "$TOTAL_GPUS" --ready-timeout "$READY_TIMEOUT")
if ((NUM_NODES > 1 || TOTAL_GPUS > 1 || FORCE_RAY)); then
  HEAD_IP=$(srun --nodes=1 --ntasks=1 --overlap -w "$HEAD_NODE" hostname --ip-address | awk '{print $1}')
  FREE_PORT='import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
  RAY_PORT=$({ "$PYTHON" -c "$FREE_PORT" || python3 -c "$FREE_PORT"; } 2>/dev/null ||
    echo $((20000 + RANDOM % 20000)))
  RAY_ADDRESS="$HEAD_IP:$RAY_PORT"
  # A fresh cluster token per job, in the environment only (srun steps inherit it).
  export RAY_AUTH_MODE=token
  RAY_AUTH_TOKEN=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
  export RAY_AUTH_TOKEN
  RAY_COMMON=(--block --num-cpus="$CPUS" --num-gpus="$GPUS_PER_NODE" --disable-usage-stats)
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=5  # the server has drained before Ray is stopped
  echo "dllm-serve: Ray head on $HEAD_NODE ($RAY_ADDRESS), $NUM_NODES node(s), $TOTAL_GPUS GPU(s)"
  launch "$HEAD_NODE" "$PYTHON" -m ray.scripts.scripts start --head --node-ip-address="$HEAD_IP" \
    --port="$RAY_PORT" --include-dashboard=false "${RAY_COMMON[@]}"
  RAY_PIDS+=("$LAUNCHED")
  for node in "${NODES[@]:1}"; do
    launch "$node" "$PYTHON" -m ray.scripts.scripts start --address="$RAY_ADDRESS" "${RAY_COMMON[@]}"
    RAY_PIDS+=("$LAUNCHED")
  done
  ENTRY_ARGS+=(--ray-address "$RAY_ADDRESS")
fi

echo "dllm-serve: job $SLURM_JOB_ID on ${NODES[*]}; server info in $INFO_FILE"
launch "$HEAD_NODE" "$PYTHON" -m dllm_serve.cluster.job "${ENTRY_ARGS[@]}" -- "${SERVE_ARGS[@]}"
SERVER_PIDS+=("$LAUNCHED")
wait "$LAUNCHED"
status=$?
cleanup
exit "$status"
"""


def render_sbatch(spec: JobSpec) -> str:
    """The complete batch script for ``spec``."""
    container: list[str] = []
    if spec.container_image:
        container.append(f"--container-image={spec.container_image}")
        if spec.container_mounts:
            container.append(f"--container-mounts={spec.container_mounts}")
    header = [
        "#!/bin/bash",
        *_directives(spec),
        "# Rendered by `dllm-serve slurm submit`. Secrets (HF_TOKEN, DLLM_SERVE_API_KEY) come from the",
        "# submitting shell's environment (--export=ALL) and are never written here.",
        "",
        f"OUTPUT_DIR={shlex.quote(spec.output_dir)}",
        f"PYTHON={shlex.quote(spec.python)}",
        f"GPUS_PER_NODE={int(spec.gpus_per_node)}",
        f"FORCE_RAY={int(spec.force_ray)}",
        f"READY_TIMEOUT={float(spec.ready_timeout):g}",
        f"CONTAINER_ARGS={_array(container)}",
        f"SERVE_ARGS={_array(spec.serve_args)}",
    ]
    return "\n".join(header) + "\n" + _BODY
