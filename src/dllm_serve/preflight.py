"""Checks that run before anything loads, so a first-run mistake costs one line and seconds.

A model takes seconds (tiny) to minutes (8B) to load; a wrong path, a missing GPU or a port in use
should not be found only after that. Each check raises ``ValueError`` or ``OSError`` with one line
saying what is wrong, which ``dllm-serve`` prints before exiting non-zero.
"""

from __future__ import annotations

import socket
from pathlib import Path

from dllm_serve.config import EngineConfig


def visible_gpus() -> tuple[int, str]:
    """How many CUDA devices torch sees, and a note on why there are none (for error messages)."""
    import torch

    if torch.version.cuda is None:
        return 0, f"torch {torch.__version__} is a CPU-only build"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return count, f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees {count} GPU(s)"


def check_gpus(gpus: int) -> None:
    """``--gpus N`` needs N GPUs on this machine (a local Ray would wait for them forever)."""
    if gpus < 1:
        return
    count, why = visible_gpus()
    if count < gpus:
        raise ValueError(
            f"--gpus {gpus} needs {gpus} GPU(s), but {count} are visible ({why}); "
            "use --replicas N for CPU replicas"
        )


def check_model(config: EngineConfig) -> None:
    """The checkpoint the engine would load exists and names an architecture we can serve."""
    from dllm_serve.models.loader import read_config, resolve_model_path
    from dllm_serve.models.registry import detect_family, has_remote_code

    if config.dcp_path:
        from dllm_serve.checkpoints.layout import find_layout

        find_layout(config.dcp_path)
        if not config.base_model:
            raise ValueError("--dcp-path needs --base-model (config and tokenizer of the trained model)")
        detect_family(read_config(resolve_model_path(config.base_model)))
        return
    path = resolve_model_path(config.model_path)
    model_config = read_config(path)
    if config.trust_remote_code and has_remote_code(model_config):
        return
    detect_family(model_config)
    if config.load_format == "safetensors" and not _has_weights(path):
        raise FileNotFoundError(
            f"{path} has neither model.safetensors nor model.safetensors.index.json "
            "(--load-format dummy serves random weights of that shape)"
        )


def _has_weights(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


def check_port_free(host: str, port: int) -> None:
    """Fail now if ``host:port`` is taken, instead of after the model has loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise OSError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port"
            ) from None
