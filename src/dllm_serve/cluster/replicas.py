"""N engine replicas under Ray Serve behind one OpenAI endpoint (`dllm-serve serve --gpus N | --replicas N`).

Each replica is the ordinary single-process server: the app ``create_app`` builds, with its own
engine, created inside the replica (in its constructor) so nothing big is pickled and the engine
loads on the replica's own GPU (Ray sets CUDA_VISIBLE_DEVICES, so it is ``cuda``). Ray Serve does
the routing (streaming responses pass through its proxy and the front), health checks and restarts.

HTTP enters through a small ``Front`` deployment (``dllm_serve.cluster.front``) that forwards each
request to a replica through a deployment handle, retries once a request that had sent no token when
its replica died, and answers replica failures in OpenAI's error shape (a 503 body, or an SSE error
event that ends a stream), which Ray Serve's proxy alone would answer with plain text.

Two endpoints are widened to the whole deployment, because a request lands on one replica only:

* ``/metrics``: every replica pushes its own Prometheus text to a small ``MetricsHub`` actor on each
  Serve health check (every few seconds) and whenever it answers ``/metrics``; the answer merges the
  fresh snapshots of all replicas, each series labelled ``replica="<id>"``, plus
  ``dllm_serve_replicas_ready``.
* ``/health``: 200 from a ready replica (Serve routes only to replicas whose engine started), with
  ``replicas_ready`` (Serve's count of RUNNING replicas) / ``replicas`` in the body; the replica's own
  503 while it drains.

Ray is imported here only: the single-replica server never imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from typing import Any

from dllm_serve.config import ServerConfig
from dllm_serve.threads import default_threads, warn_if_oversubscribed

log = logging.getLogger(__name__)

APP_NAME = "dllm-serve"
DEPLOYMENT_NAME = "DllmReplica"
FRONT_NAME = "DllmFront"
FRONT_MAX_ONGOING = 100_000  # every request passes the front; the replicas' own limits apply behind it
NAMESPACE = "dllm_serve"
HUB_NAME = "dllm-serve-metrics-hub"
STALE_AFTER_S = 15.0  # three missed health checks: the replica is gone
HEALTH_PERIOD_S = 5.0
STARTUP_TIMEOUT_ENV = "DLLM_SERVE_STARTUP_TIMEOUT"
OBJECT_STORE_MB_ENV = "DLLM_SERVE_RAY_OBJECT_STORE_MB"
API_KEY_ENV = "DLLM_SERVE_API_KEY"


# ---------------------------------------------------------------- metrics merging (pure, tested alone)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _label_sample(line: str, label: str) -> str:
    """``name{a="b"} 1`` -> ``name{replica="x",a="b"} 1``; ``name 1`` -> ``name{replica="x"} 1``."""
    brace, space = line.find("{"), line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        inner = line[brace + 1 :]
        sep = "" if inner.startswith("}") else ","
        return f"{line[: brace + 1]}{label}{sep}{inner}"
    return f"{line[:space]}{{{label}}}{line[space:]}"


def merge_prometheus(snapshots: dict[str, str]) -> str:
    """One exposition from several replicas' texts: a family's HELP/TYPE once, its samples together."""
    families: OrderedDict[str, tuple[list[str], list[str]]] = OrderedDict()
    for replica, text in sorted(snapshots.items()):
        label = f'replica="{_escape(replica)}"'
        current: str | None = None
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(maxsplit=3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    current = parts[2]
                    header, _ = families.setdefault(current, ([], []))
                    if not any(h.split(maxsplit=2)[:2] == parts[:2] for h in header):
                        header.append(line)
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            key = current if current is not None and name.startswith(current) else name
            families.setdefault(key, ([], []))[1].append(_label_sample(line, label))
    out = []
    for header, samples in families.values():
        out += header + samples
    return "\n".join(out) + "\n"


def replica_config(config: ServerConfig, use_gpu: bool) -> ServerConfig:
    """The config one replica serves with: one device, no further scale-out."""
    cfg = copy.deepcopy(config)
    cfg.gpus, cfg.replicas, cfg.ray_address = 0, 1, None
    if use_gpu:
        cfg.engine.device = "cuda"  # Ray has narrowed CUDA_VISIBLE_DEVICES to this replica's GPU
    elif cfg.engine.device == "auto":
        cfg.engine.device = "cpu"
    return cfg


def with_replica_threads(config: ServerConfig, n: int) -> ServerConfig:
    """Each replica's torch threads, decided here once: ``--threads``, or the usable cores divided
    among the n replicas when they share this machine (a local Ray); one warning if oversubscribed.
    With ``--ray-address`` replicas may sit on other machines, so each takes its own default."""
    cfg = copy.deepcopy(config)
    if cfg.engine.threads is None and not cfg.ray_address:
        cfg.engine.threads = default_threads(n)
    if cfg.engine.threads is not None and not cfg.ray_address:
        warn_if_oversubscribed(cfg.engine.threads, n)
    return cfg


# ---------------------------------------------------------------- pieces that live inside Ray


class MetricsHub:
    """Latest Prometheus snapshot and health of every replica (a Ray actor, no resources)."""

    def __init__(self) -> None:
        self.snapshots: dict[str, tuple[float, str, bool]] = {}

    def push(self, replica: str, text: str | None, healthy: bool) -> None:
        old = self.snapshots.get(replica)
        if text is None and old is not None:
            text = old[1]
        self.snapshots[replica] = (time.time(), text or "", healthy)

    def collect(self) -> dict[str, tuple[str, bool]]:
        cutoff = time.time() - STALE_AFTER_S
        self.snapshots = {r: s for r, s in self.snapshots.items() if s[0] >= cutoff}
        return {r: (text, healthy) for r, (_, text, healthy) in self.snapshots.items()}


class _Wrapped:
    """ASGI app: the replica's own server, with /health and /metrics widened to the deployment."""

    def __init__(self, inner, owner: ReplicaServer):
        self.inner, self.owner = inner, owner

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self.inner(scope, receive, self._startup_waits_for_engine(send))
        if scope["type"] == "http" and scope.get("method") == "GET":
            path = scope.get("path", "").rstrip("/")
            if path == "/metrics":
                text = await self.owner.all_metrics()
                return await self._send(send, 200, text, "text/plain; version=0.0.4")
            if path == "/health":
                status, body = await self.owner.deployment_health()
                return await self._send(send, status, json.dumps(body), "application/json")
        await self.inner(scope, receive, send)

    def _startup_waits_for_engine(self, send):
        """The app loads its engine in the background after startup; hold Serve's "started" until the
        engine is ready (or report the load failure), so Serve routes only to replicas that can answer."""

        async def wrapped(message) -> None:
            if message.get("type") == "lifespan.startup.complete":
                error = await self.owner.wait_engine_ready()
                if error is not None:
                    message = {"type": "lifespan.startup.failed", "message": error}
            await send(message)

        return wrapped

    @staticmethod
    async def _send(send, status: int, body: str, content_type: str) -> None:
        data = body.encode()
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


class ReplicaServer:
    """One replica: the normal app for its device, fed by the front; Serve calls ``check_health``."""

    # Ray Serve awaits an async constructor (to a type checker, __init__ must return None).
    async def __init__(self, config: ServerConfig, use_gpu: bool, expected: int, hub=None):  # type: ignore[misc]
        from ray import serve
        from uvicorn.config import Config
        from uvicorn.lifespan.on import LifespanOn

        from dllm_serve.server.app import create_app

        self.config = replica_config(config, use_gpu)
        self.expected = expected
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._hub = hub
        self.inner = create_app(self.config)
        self.wrapped = _Wrapped(self.inner, self)
        # Only the front is an ASGI ingress (Serve allows one), so this replica runs its app's
        # lifespan itself; startup returns once the engine is ready, so Serve counts the replica
        # as started only then and never routes to a replica that cannot answer.
        self._lifespan = LifespanOn(
            Config(self.wrapped, lifespan="on", log_config=None, log_level=None, access_log=False)
        )
        await self._lifespan.startup()
        if self._lifespan.should_exit:
            raise RuntimeError("the model failed to load (see the replica log above)")

    async def __del__(self) -> None:
        """Serve's graceful stop: the app's shutdown drains running requests and stops the engine."""
        lifespan = getattr(self, "_lifespan", None)
        if lifespan is not None:
            await lifespan.shutdown()

    async def forward(self, scope: dict[str, Any], body: bytes):
        """One HTTP request from the front, run through this replica's app; yields its ASGI messages."""
        from dllm_serve.cluster.front import run_asgi

        async for message in run_asgi(self.wrapped, scope, body):
            yield message

    def _hub_handle(self):
        if self._hub is None:
            import ray

            with contextlib.suppress(ValueError):
                self._hub = ray.get_actor(HUB_NAME, namespace=NAMESPACE)
        return self._hub

    async def _local(self, path: str) -> tuple[int, str]:
        """GET ``path`` from this replica's own app, in process."""
        import httpx

        transport = httpx.ASGITransport(app=self.inner)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
            r = await client.get(path, headers=headers, timeout=30)
            return r.status_code, r.text

    async def wait_engine_ready(self, poll_s: float = 0.5) -> str | None:
        """Poll the app's own /health until 200; the error text if the model failed to load."""
        while True:
            status, text = await self._local("/health")
            if status == 200:
                return None
            with contextlib.suppress(ValueError, AttributeError):
                if json.loads(text).get("status") == "failed":
                    return "the model failed to load (see the replica log above)"
            await asyncio.sleep(poll_s)

    async def _push(self) -> tuple[int, str | None]:
        status, _ = await self._local("/health")
        m_status, text = await self._local("/metrics")
        hub = self._hub_handle()
        if hub is not None:
            with contextlib.suppress(Exception):
                await hub.push.remote(self.replica_id, text if m_status == 200 else None, status == 200)
        return status, (text if m_status == 200 else None)

    async def check_health(self) -> None:
        """Serve's health check: also the moment the replica reports its metrics to the hub."""
        status, _ = await self._push()
        if status >= 500 and status != 503:
            raise RuntimeError(f"replica /health answered {status}")

    async def _collect(self) -> dict[str, tuple[str, bool]]:
        hub = self._hub_handle()
        if hub is None:
            return {}
        try:
            return await hub.collect.remote()
        except Exception:  # the hub is gone (driver exiting): answer with what this replica knows
            return {}

    async def _running_replicas(self, fallback: int) -> int:
        """How many replicas Serve itself reports RUNNING (its own view; the hub may lag)."""
        from ray import serve
        from ray.serve.schema import ReplicaState

        try:
            status = await asyncio.to_thread(serve.status)
            deployment = status.applications[APP_NAME].deployments[DEPLOYMENT_NAME]
            return int(deployment.replica_states.get(ReplicaState.RUNNING, 0))
        except Exception:
            return fallback

    async def all_metrics(self) -> str:
        _, own = await self._push()
        snaps = await self._collect()
        texts = {r: t for r, (t, _) in snaps.items() if t}
        if own is not None:
            texts[self.replica_id] = own
        ready = await self._running_replicas(sum(1 for _, ok in snaps.values() if ok) or 1)
        summary = (
            "# HELP dllm_serve_replicas_ready Replicas whose engine is ready, as last reported.\n"
            "# TYPE dllm_serve_replicas_ready gauge\n"
            f"dllm_serve_replicas_ready {ready}\n"
            "# HELP dllm_serve_replicas Replicas the deployment asks for.\n"
            "# TYPE dllm_serve_replicas gauge\n"
            f"dllm_serve_replicas {self.expected}\n"
        )
        return summary + merge_prometheus(texts)

    async def deployment_health(self) -> tuple[int, dict[str, Any]]:
        status, text = await self._local("/health")
        snaps = await self._collect()
        ready = await self._running_replicas(sum(1 for _, ok in snaps.values() if ok) or int(status == 200))
        body: dict[str, Any] = {"status": "ok" if status == 200 else "unavailable"}
        with contextlib.suppress(ValueError):
            inner = json.loads(text)
            if isinstance(inner, dict):
                body = {**inner, **{k: v for k, v in body.items() if k not in inner}}
        body.update(replica=self.replica_id, replicas_ready=ready, replicas=self.expected)
        return status, body


# ---------------------------------------------------------------- the driver


def _startup_timeout() -> float:
    return float(os.environ.get(STARTUP_TIMEOUT_ENV, "3600"))


def _init_ray(config: ServerConfig, n: int, use_gpu: bool) -> bool:
    """Join ``--ray-address`` or start a small local Ray; True when we started it (and must stop it)."""
    import ray

    common: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": True, "configure_logging": False}
    if config.ray_address:
        ray.init(address=config.ray_address, **common)
        return False
    store_mb = int(os.environ.get(OBJECT_STORE_MB_ENV, "256"))
    ray.init(
        address="local",  # a new local instance, never one a stale /tmp/ray record points at
        num_cpus=None if use_gpu else n,
        include_dashboard=False,
        object_store_memory=store_mb * 1024 * 1024,
        **common,
    )
    return True


class Front:
    """The application's ingress: forwards every request to a replica (see ``dllm_serve.cluster.front``)."""

    def __init__(self, replicas) -> None:
        from dllm_serve.cluster.front import FrontApp

        self.front = FrontApp(replicas)  # not ``app``: Serve's ASGI wrapper owns that name

    def __serve_build_asgi_app__(self):
        return self.front


REPLICA_SHUTDOWN_MARGIN_S = 10.0  # after the drain: abort errors sent, engine stopped


def _deployment(config: ServerConfig, n: int, use_gpu: bool, hub, replica_cls: type = ReplicaServer):
    from ray import serve

    actor_options: dict[str, Any] = {"num_cpus": 1}
    if use_gpu:
        actor_options["num_gpus"] = 1
    replicas = serve.deployment(
        name=DEPLOYMENT_NAME,
        num_replicas=n,
        ray_actor_options=actor_options,
        max_ongoing_requests=max(2 * config.engine.max_batch_size, 4),
        health_check_period_s=HEALTH_PERIOD_S,
        health_check_timeout_s=60.0,
        # Each replica drains for --drain-timeout, then ends what still runs with OpenAI-shaped
        # errors; Ray must not kill it before those have gone out.
        graceful_shutdown_timeout_s=config.drain_timeout + REPLICA_SHUTDOWN_MARGIN_S,
        # A replica that cannot build its engine (bad path, no memory) rarely succeeds on retry:
        # give up after a few tries so the command fails with the reason instead of looping.
        max_constructor_retry_count=max(3, n),
    )(replica_cls).bind(config, use_gpu, n, hub)
    return serve.deployment(
        name=FRONT_NAME,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=FRONT_MAX_ONGOING,
    )(serve.ingress()(Front)).bind(replicas)


def _wait_running(deadline: float, stop: threading.Event) -> bool:
    """Poll Serve until the application runs (True) or we are told to stop (False); raise with Serve's
    own message if it fails or the deadline passes."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    last = None
    while time.monotonic() < deadline:
        if stop.is_set():
            return False
        app = serve.status().applications.get(APP_NAME)
        if app is not None:
            last = app
            if app.status == ApplicationStatus.RUNNING:
                return True
            if app.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
                raise RuntimeError(f"replicas failed to start: {app.message or app.status}")
        stop.wait(1.0)
    raise TimeoutError(f"replicas not running after the deadline (last status: {last and last.status})")


def serve_replicas(config: ServerConfig) -> int:
    """Run the replicated server until SIGINT/SIGTERM; returns the process exit code."""
    import ray
    from ray import serve

    use_gpu = config.gpus > 1
    n = config.gpus if use_gpu else max(config.replicas, 1)
    config = with_replica_threads(config, n)
    if config.api_key is None and os.environ.get(API_KEY_ENV):
        # Replicas on other nodes need not share our environment; the key travels inside the config.
        config = copy.deepcopy(config)
        config.api_key = os.environ[API_KEY_ENV]
    started_ray = _init_ray(config, n, use_gpu)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        hub_cls = ray.remote(num_cpus=0)(MetricsHub)
        # The replicas get the handle; holding it here too keeps the hub alive while replicas restart.
        hub = hub_cls.options(name=HUB_NAME, namespace=NAMESPACE, get_if_exists=True).remote()
        serve.start(proxy_location="HeadOnly", http_options={"host": config.host, "port": config.port})
        serve.run_many(
            [serve.RunTarget(_deployment(config, n, use_gpu, hub), name=APP_NAME, route_prefix="/")],
            wait_for_applications_running=False,
        )
        if _wait_running(time.monotonic() + _startup_timeout(), stop):
            log.info("%d replica(s) running at http://%s:%d", n, config.host, config.port)
            while not stop.wait(1.0):  # a timeout keeps the main thread responsive to signals
                pass
    except (RuntimeError, TimeoutError) as exc:
        log.error("%s", exc)
        code = 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)  # drains in-flight requests (graceful_shutdown_timeout_s)
        if started_ray:
            ray.shutdown()
    return code
