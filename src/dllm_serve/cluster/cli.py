"""`dllm-serve slurm submit|status|connect|stop`: serve a model as a SLURM job and find it again."""

from __future__ import annotations

import argparse
import json
import os
import sys

from dllm_serve.cluster import slurm
from dllm_serve.cluster.sbatch import JobSpec, render_sbatch


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser(
        "slurm",
        help="run the server as a SLURM job (submit, status, connect, stop)",
        description="Run `dllm-serve serve` as a SLURM job. Everything after `--` on submit is passed "
        "to `dllm-serve serve`. Secrets travel in the environment: export HF_TOKEN and "
        "DLLM_SERVE_API_KEY before submitting.",
    )
    sp = group.add_subparsers(dest="slurm_command", required=True, metavar="ACTION")

    s = sp.add_parser("submit", help="submit a serving job (args after -- go to `dllm-serve serve`)")
    s.add_argument("--account", default=os.environ.get("ACCOUNT"), help="default: $ACCOUNT")
    s.add_argument("--partition", default=None)
    s.add_argument("--time", default="04:00:00", help="wall-clock limit (default 04:00:00)")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=0, help="one replica per GPU (default 0: CPU)")
    s.add_argument("--cpus-per-task", type=int, default=None)
    s.add_argument("--mem", default=None, help="memory per node, e.g. 64G")
    s.add_argument("--job-name", default="dllm-serve")
    s.add_argument(
        "--output-dir",
        default=None,
        help="script, log and info file (default: $DLLM_SERVE_JOBS_DIR or ~/.dllm-serve/jobs)",
    )
    s.add_argument("--container-image", default=None, help="run inside this image (pyxis/enroot)")
    s.add_argument("--container-mounts", default=None, help="pyxis --container-mounts value")
    s.add_argument(
        "--python", default=None, help="interpreter in the job (default: this one; python3 in a container)"
    )
    s.add_argument("--ray", action="store_true", help="start a Ray cluster even for one node / one GPU")
    s.add_argument("--ready-timeout", type=float, default=3600.0, help="seconds the job waits for /health")
    s.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch option, e.g. --qos=high")
    s.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    s.add_argument("--json", action="store_true", help="print the submission as JSON")
    s.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then arguments for `dllm-serve serve`")
    s.set_defaults(func=run_submit)

    st = sp.add_parser("status", help="the job's server status (info file + squeue/sacct)")
    st.add_argument("--job-id", required=True)
    st.add_argument("--output-dir", default=None)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=run_status)

    c = sp.add_parser("connect", help="wait until the job's server is ready and print the ssh tunnel")
    c.add_argument("--job-id", required=True)
    c.add_argument("--output-dir", default=None)
    c.add_argument("--login-node", default=None, help="host to tunnel through (default: this host)")
    c.add_argument("--local-port", type=int, default=None, help="local port (default: the server's)")
    c.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for ready")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=run_connect)

    k = sp.add_parser("stop", help="cancel the job (scancel) and mark it stopped")
    k.add_argument("--job-id", required=True)
    k.add_argument("--output-dir", default=None)
    k.set_defaults(func=run_stop)


def _spec(args: argparse.Namespace) -> JobSpec:
    serve_args = list(args.serve_args)
    if serve_args[:1] == ["--"]:
        serve_args = serve_args[1:]
    output_dir = os.path.abspath(args.output_dir or slurm.default_output_dir())
    return JobSpec(
        output_dir=output_dir,
        python=slurm.python_for_job(args.container_image, args.python),
        job_name=args.job_name,
        account=args.account,
        partition=args.partition,
        time=args.time,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        container_image=args.container_image,
        container_mounts=args.container_mounts,
        force_ray=args.ray,
        ready_timeout=args.ready_timeout,
        extra_sbatch=args.sbatch_arg,
        serve_args=serve_args,
    )


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


def run_submit(args: argparse.Namespace) -> int:
    try:
        spec = _spec(args)
        slurm.check_no_secrets(spec.serve_args)
        if args.dry_run:
            print(render_sbatch(spec), end="")
            return 0
        sub = slurm.submit(spec)
    except slurm.SlurmError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps({k: str(v) for k, v in vars(sub).items()}))
    else:
        print(f"submitted job {sub.job_id}")
        print(f"  info file: {sub.info_path}")
        print(f"  log:       {sub.log_path}")
        print(f"  next:      dllm-serve slurm connect --job-id {sub.job_id} --output-dir {spec.output_dir}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    try:
        doc = slurm.job_status(args.job_id, args.output_dir)
    except slurm.SlurmError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(f"job {args.job_id}: {doc.get('status')} (scheduler: {doc.get('scheduler_state')})")
        for key in ("node", "base_url", "reason", "scheduler_reason", "log", "info_file"):
            if doc.get(key):
                print(f"  {key}: {doc[key]}")
    return 0 if doc.get("status") != "failed" else 1


def run_connect(args: argparse.Namespace) -> int:
    try:
        doc = slurm.wait_ready(args.job_id, args.output_dir, args.timeout)
    except slurm.SlurmError as exc:
        return _fail(exc)
    tunnel = slurm.tunnel_command(doc, args.login_node, args.local_port)
    local = f"http://localhost:{args.local_port or doc['port']}/v1"
    direct = slurm.check_health(doc)
    if args.json:
        print(json.dumps({"tunnel": tunnel, "local_base_url": local, "reachable": direct, **doc}))
        return 0
    print(f"job {args.job_id} is ready on {doc['node']}: {doc['base_url']}")
    print(f"  direct /health from here: {'ok' if direct else 'not reachable'}")
    print("  tunnel from your machine (keep it open):")
    print(f"    {tunnel}")
    print(f"  then use base URL {local}")
    return 0


def run_stop(args: argparse.Namespace) -> int:
    try:
        doc = slurm.stop(args.job_id, args.output_dir)
    except slurm.SlurmError as exc:
        return _fail(exc)
    print(f"job {args.job_id}: {doc['status']}")
    return 0
