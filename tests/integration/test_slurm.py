"""`dllm-serve slurm` against a real one-node SLURM cluster (slurmctld + slurmd + munged on localhost).

The fixture starts the daemons from Debian's slurm-wlm and munge with a generated slurm.conf
(scripts/ci/slurm_cluster.py) and stops them afterwards. A job serves the bundled tiny-llada on the
CPU: the test waits for ``ready`` in the job's own info file, queries it with the openai client,
reads status, connect and stop; a second job whose server cannot start must read ``failed`` with
the server's own error as the reason.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from dllm_serve.cluster.info import read_info
from tests.helpers import REPO, TINY_LLADA

sys.path.insert(0, str(REPO / "scripts" / "ci"))
from slurm_cluster import LocalSlurm, missing_programs

API_KEY = "sk-slurm-test-4f1c9a"  # must never appear in the batch script or any command line
READY_TIMEOUT = 150.0

needs_slurm = pytest.mark.skipif(
    bool(missing_programs()) or os.geteuid() != 0,
    reason="needs root and Debian's slurm-wlm + munge (scripts/test.sh installs them)",
)


def cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "dllm_serve.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )
    if check and proc.returncode != 0:
        cmd = " ".join(args)
        raise AssertionError(f"dllm-serve {cmd} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_status(info: Path, wanted: set[str], timeout: float) -> dict:
    """Poll the job's info file until its status is one of ``wanted``."""
    deadline = time.monotonic() + timeout
    doc = None
    while time.monotonic() < deadline:
        doc = read_info(info)
        if doc and doc.get("status") in wanted:
            return doc
        time.sleep(0.5)
    log = Path(doc["log"]).read_text() if doc and Path(doc.get("log", "/nonexistent")).exists() else ""
    raise AssertionError(f"status never reached {wanted}: {doc}\n{log[-3000:]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    c = LocalSlurm(root).start()
    env = {**os.environ, **c.env(), "OMP_NUM_THREADS": "1", "DLLM_SERVE_API_KEY": API_KEY}
    try:
        yield c, env
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            q = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
            if q.returncode != 0 or not q.stdout.strip():
                break
            time.sleep(0.5)
        c.stop()


def submit(env: dict[str, str], out: Path, name: str, *serve_args: str) -> tuple[str, Path]:
    proc = cli(
        "slurm", "submit", "--account", "test", "--time", "00:10:00", "--cpus-per-task", "1", "--mem", "2G",
        "--job-name", name, "--output-dir", str(out), "--json", "--", *serve_args, env=env,
    )  # fmt: skip
    sub = json.loads(proc.stdout)
    return sub["job_id"], Path(sub["info_path"])


def status_json(env: dict[str, str], out: Path, job_id: str) -> dict:
    proc = cli("slurm", "status", "--job-id", job_id, "--output-dir", str(out), "--json", env=env)
    return json.loads(proc.stdout)


def test_dry_run_renders_one_script_for_all_shapes(tmp_path):
    proc = cli(
        "slurm", "submit", "--account", "acct", "--partition", "gpu", "--nodes", "2", "--gpus-per-node", "4",
        "--cpus-per-task", "16", "--mem", "200G", "--time", "01:00:00", "--job-name", "big",
        "--output-dir", str(tmp_path), "--container-image", "nvcr.io/org/img:1",
        "--container-mounts", "/d:/d", "--dry-run",
        "--", "--model-path", "/models/a b", "--max-batch-size", "16",
    )  # fmt: skip
    script = proc.stdout
    for directive in (
        "--account=acct", "--partition=gpu", "--nodes=2", "--gpus-per-node=4", "--cpus-per-task=16",
        "--mem=200G", "--time=01:00:00", "--job-name=big", "--export=ALL", f"--output={tmp_path}/%x-%j.log",
    ):  # fmt: skip
        assert f"#SBATCH {directive}" in script, directive
    assert "SERVE_ARGS=(--model-path '/models/a b' --max-batch-size 16)" in script
    assert "--container-image=nvcr.io/org/img:1 --container-mounts=/d:/d" in script
    assert "ray.scripts.scripts start --head" in script and "--address=" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert not list(tmp_path.iterdir()), "a dry run submits nothing and writes nothing"


def test_api_key_on_the_command_line_is_refused(tmp_path):
    proc = cli(
        "slurm", "submit", "--output-dir", str(tmp_path), "--dry-run", "--", "--api-key", "x", check=False
    )  # fmt: skip
    assert proc.returncode != 0 and "DLLM_SERVE_API_KEY" in proc.stderr


def test_job_is_ready_only_when_every_replica_is():
    """The job's readiness poll over real HTTP: Serve's proxy answers 200 with 1 of 2 replicas up."""
    from dllm_serve.cluster.job import server_ready

    answers: list[tuple[int, dict]] = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = answers[0]
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    port = httpd.server_address[1]
    try:
        for answer, ready in [
            ((503, {"status": "loading"}), False),
            ((200, {"status": "ok", "replicas_ready": 1, "replicas": 2}), False),
            ((200, {"status": "ok", "replicas_ready": 2, "replicas": 2}), True),
            ((200, {"status": "ok"}), True),  # the single-process server has no replica counts
        ]:
            answers[:] = [answer]
            assert server_ready(port) is ready, answer
    finally:
        httpd.shutdown()
        httpd.server_close()


@needs_slurm
def test_job_serves_tiny_llada_then_stops(cluster, tmp_path):
    import openai

    _, env = cluster
    job_id, info = submit(env, tmp_path, "serve-ok", "--model-path", str(TINY_LLADA), "--max-batch-size", "4")
    doc = wait_status(info, {"ready", "failed"}, READY_TIMEOUT)
    assert doc["status"] == "ready", doc
    assert doc["job_id"] == job_id and doc["node"] and doc["port"]
    assert doc["base_url"] == f"http://{doc['host']}:{doc['port']}/v1"
    assert {"pending_at", "starting_at", "ready_at"} <= set(doc["timestamps"])

    # The secret travelled in the environment only.
    assert API_KEY not in Path(doc["script"]).read_text()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            assert API_KEY.encode() not in cmdline.read_bytes(), cmdline

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{doc['port']}/v1", api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "What is 2 + 3?"}],
        max_tokens=16,
        temperature=0,
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()

    status = status_json(env, tmp_path, job_id)
    assert status["status"] == "ready" and status["scheduler_state"] == "RUNNING"

    conn = json.loads(
        cli("slurm", "connect", "--job-id", job_id, "--output-dir", str(tmp_path), "--login-node", "login1",
            "--timeout", "30", "--json", env=env).stdout
    )  # fmt: skip
    assert conn["tunnel"] == f"ssh -N -L {doc['port']}:{doc['node']}:{doc['port']} login1"
    assert conn["reachable"] is True

    cli("slurm", "stop", "--job-id", job_id, "--output-dir", str(tmp_path), env=env)
    assert read_info(info)["status"] == "stopped"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = status_json(env, tmp_path, job_id)
        if status["scheduler_state"] not in ("RUNNING", "COMPLETING"):
            break
        time.sleep(0.5)
    assert status["status"] == "stopped" and status["scheduler_state"] == "CANCELLED", status
    with pytest.raises(openai.APIConnectionError):
        client.models.list()


@needs_slurm
def test_job_that_cannot_start_reads_failed_with_reason(cluster, tmp_path):
    _, env = cluster
    job_id, info = submit(env, tmp_path, "serve-bad", "--model-path", str(tmp_path / "no-such-model"))
    doc = wait_status(info, {"failed", "ready"}, READY_TIMEOUT)
    assert doc["status"] == "failed", doc
    assert "before it was ready" in doc["reason"] and "exited with code" in doc["reason"]
    assert "no-such-model" in doc["reason"], "the reason carries the server's own error"
    proc = cli("slurm", "status", "--job-id", job_id, "--output-dir", str(tmp_path), check=False, env=env)
    assert proc.returncode == 1 and "failed" in proc.stdout and "no-such-model" in proc.stdout


@needs_slurm
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray[serve]")
def test_ray_path_of_the_same_script_serves_two_replicas(cluster, tmp_path):
    """--ray takes the multi-node path on one node: Ray head, serve --ray-address, 2 CPU replicas."""
    import openai

    _, env = cluster
    env = {**env, "DLLM_SERVE_RAY_OBJECT_STORE_MB": "100"}
    proc = cli(
        "slurm", "submit", "--time", "00:10:00", "--cpus-per-task", "2", "--job-name", "serve-ray", "--ray",
        "--output-dir", str(tmp_path), "--json", "--",
        "--model-path", str(TINY_LLADA), "--replicas", "2", "--device", "cpu", "--max-batch-size", "4",
        env=env,
    )  # fmt: skip
    sub = json.loads(proc.stdout)
    job_id, info = sub["job_id"], Path(sub["info_path"])
    doc = wait_status(info, {"ready", "failed"}, 240)
    assert doc["status"] == "ready", doc
    assert doc["ray_address"], "the job started its own Ray head"
    health = httpx.get(f"http://127.0.0.1:{doc['port']}/health", timeout=10).json()
    assert health["replicas"] == 2 and health["replicas_ready"] == 2, health
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{doc['port']}/v1", api_key=API_KEY, max_retries=0)
    reply = client.completions.create(
        model=client.models.list().data[0].id, prompt="Copy the list: a b c", max_tokens=8
    )
    assert reply.choices[0].finish_reason in ("stop", "length")

    cli("slurm", "stop", "--job-id", job_id, "--output-dir", str(tmp_path), env=env)
    ray_port = doc["ray_address"].rsplit(":", 1)[1]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = [c for c in _cmdlines() if "ray" in c and f"={ray_port}" in c]
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"the job left Ray processes behind: {left}"


def _cmdlines() -> list[str]:
    out = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            out.append(path.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return out


@needs_slurm
def test_example_slurm_workflow_runs_end_to_end(cluster, tmp_path):
    """examples/slurm_workflow.sh unchanged: submit, wait for ready, query, stop (by its EXIT trap)."""
    _, env = cluster
    env = {
        **env,
        "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
        "MODEL": str(TINY_LLADA),
        "ACCOUNT": "test",
        "GPUS_PER_NODE": "0",
        "CPUS_PER_TASK": "1",
        "MEM": "2G",
        "TIME": "00:10:00",
        "READY_TIMEOUT": str(READY_TIMEOUT),
        "SERVE_ARGS": "--max-batch-size 4",
        "DLLM_SERVE_JOBS_DIR": str(tmp_path),
    }
    proc = subprocess.run(
        ["bash", str(REPO / "examples" / "slurm_workflow.sh")],
        capture_output=True, text=True, env=env, timeout=READY_TIMEOUT + 120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reply = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert reply["choices"][0]["message"]["content"] == "s l u r m j o b s r u n f a s t"
    job_id = proc.stdout.split("submitted job ")[1].split()[0]
    assert f"job {job_id}: stopped" in proc.stdout, "the EXIT trap stopped the job"
    assert API_KEY not in proc.stdout + proc.stderr
