"""`dllm-serve serve`: the OpenAI-compatible server.

With no arguments it serves the bundled tiny-llada on the best device present, on 127.0.0.1:8000.
Flags keep the old batch server's names where they exist. ``--gpus N`` / ``--replicas N`` (N > 1)
hand over to Ray Serve (``dllm_serve.cluster.replicas``), imported only then, so the single-replica
path never imports Ray.
"""

from __future__ import annotations

import argparse
import logging
import os

from dllm_serve.config import ServerConfig, add_engine_arguments, engine_config_from_args

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a diffusion LM over an OpenAI-compatible HTTP API (default: bundled tiny-llada).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_engine_arguments(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="bind address (127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port")
    s.add_argument("--served-model-name", default=None, help="model id in the API (None: directory name)")
    s.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 (None: $DLLM_SERVE_API_KEY; no key if unset)",
    )
    s.add_argument("--max-queue", type=int, default=1024, help="waiting requests beyond this get HTTP 429")
    s.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="seconds before a request is cut off with 504 (None: no limit)",
    )
    s.add_argument("--no-chat-template", action="store_true", help="send chat messages as raw text")
    s.add_argument("--timeout-keep-alive", type=int, default=5, help="seconds an idle connection stays open")
    s.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=ServerConfig.max_request_bytes,
        help="larger request bodies get HTTP 413 before they are parsed (2097152 = 2 MiB; docs/serving.md)",
    )
    s.add_argument(
        "--drain-timeout",
        type=float,
        default=ServerConfig.drain_timeout,
        help="on SIGTERM, seconds running requests may take before they are ended",
    )
    s.add_argument(
        "--allow-special-tokens-in-content",
        action="store_true",
        help="trusted callers only: special-token strings in chat messages act as control tokens",
    )
    s.add_argument(
        "--allowed-origins",
        default="",
        help="comma-separated browser origins allowed by CORS (empty: none)",
    )
    s.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    r = p.add_argument_group("scale-out (Ray Serve)")
    r.add_argument(
        "--gpus", type=int, default=0, help="1: serve on the GPU; N > 1: one replica per GPU under Ray Serve"
    )
    r.add_argument("--replicas", type=int, default=1, help="N > 1: N replicas under Ray Serve")
    r.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    p.set_defaults(func=run_serve)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    engine = engine_config_from_args(args)
    engine.max_queue = args.max_queue
    if args.gpus >= 1:
        if engine.device == "cpu":
            raise ValueError(f"--gpus {args.gpus} and --device cpu contradict each other; drop one")
        if engine.device == "auto":
            engine.device = "cuda"
    return ServerConfig(
        engine=engine,
        host=args.host,
        port=args.port,
        api_key=args.api_key if args.api_key is not None else (os.environ.get("DLLM_SERVE_API_KEY") or None),
        served_model_name=args.served_model_name,
        use_chat_template=not args.no_chat_template,
        request_timeout=args.request_timeout,
        timeout_keep_alive=args.timeout_keep_alive,
        verbose=bool(getattr(args, "verbose", False)),
        max_request_bytes=args.max_request_bytes,
        drain_timeout=args.drain_timeout,
        allow_special_tokens_in_content=args.allow_special_tokens_in_content,
        allowed_origins=[o.strip() for o in args.allowed_origins.split(",") if o.strip()],
        gpus=args.gpus,
        replicas=args.replicas,
        ray_address=args.ray_address,
    )


def run_serve(args: argparse.Namespace) -> int:
    from dllm_serve import preflight

    config = server_config_from_args(args)
    replicated = config.gpus > 1 or config.replicas > 1
    if not (replicated and config.ray_address):  # a cluster we join may hold GPUs and files we lack
        preflight.check_gpus(config.gpus)
        config.engine.resolved_device()  # --device cuda without CUDA: say so now, not after loading
        preflight.check_model(config.engine)
    # Bound and released at once: uvicorn (or Ray's proxy) binds it again within a second or so.
    preflight.check_port_free(config.host, config.port)
    if replicated:
        from dllm_serve.cluster.replicas import serve_replicas

        return serve_replicas(config)
    return serve_single(config)


def serve_single(config: ServerConfig) -> int:
    """One engine in this process under uvicorn; returns 1 when the model fails to load."""
    import uvicorn

    from dllm_serve.server.app import create_app
    from dllm_serve.server.middleware import log_request_ids
    from dllm_serve.server.shutdown import GRACEFUL_EXIT_S, DrainingServer

    log_request_ids()
    app = create_app(config)
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            timeout_keep_alive=config.timeout_keep_alive,
            timeout_graceful_shutdown=GRACEFUL_EXIT_S,
            log_level="debug" if config.verbose else "info",
            access_log=config.verbose,
        ),
        app.state.server,
    )

    def stop(_: BaseException) -> None:
        server.should_exit = True

    app.state.server.on_load_failed.append(stop)
    log.info("loading %s; /health answers 503 until it is ready", app.state.server.model_id)
    server.run()
    return 1 if app.state.server.load_error is not None else 0
