"""Engine and server settings: the one place the CLI flags map onto."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# The bundled model served when no --model-path is given (repo checkout or installed data).
BUNDLED_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
DEFAULT_MODEL = BUNDLED_MODELS_DIR / "tiny-llada"


@dataclass
class EngineConfig:
    model_path: str = str(DEFAULT_MODEL)
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda if present, else cpu
    engine: str = "auto"  # auto | fast-dllm | dinfer | nemotron | nemotron-labs
    algorithm: str | None = None  # default preset; None: the engine's default
    load_format: str = "safetensors"  # safetensors | dummy
    max_batch_size: int = 32
    max_num_tokens: int = 65536  # sum of canvas lengths running at once
    max_wait_time: float = 0.0  # seconds to wait for arrivals before a step when not full
    max_queue: int = 1024  # waiting requests beyond this are refused (HTTP 429)
    max_model_len: int | None = None  # None: the model's own maximum; limits one request
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of device memory for weights + activations + KV
    kv_cache_memory: str | None = None  # KV bytes ("2GiB"); None: measured on CUDA, 2 GiB on the CPU
    prompt_cache_memory: str | None = None  # block-causal prompt cache; None: a tenth of the KV budget
    # Training checkpoints (DCP): converted once, cached.
    dcp_path: str | None = None
    base_model: str | None = None
    dcp_cache_dir: str | None = None
    trust_remote_code: bool = False
    cuda_graphs: bool = False  # replay cached block steps as CUDA graphs (CUDA only)
    threads: int | None = None  # torch CPU threads; None: dllm_serve.threads.default_threads

    def resolved_device(self) -> str:
        """The torch device to load on; an explicit CUDA device torch cannot use is a clear error."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda"):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = self.device.partition(":")[2]
            if count == 0 or (index.isdigit() and int(index) >= count):
                why = (
                    f"torch {torch.__version__} is a CPU-only build"
                    if torch.version.cuda is None
                    else f"torch sees {count} GPU(s)"
                )
                raise ValueError(f"--device {self.device} is not available: {why}; use --device cpu")
        return self.device

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.resolved_device().startswith("cuda") else "float32"


@dataclass
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    use_chat_template: bool = True
    request_timeout: float | None = None  # seconds; None: no limit
    timeout_keep_alive: int = 5
    verbose: bool = False
    # Hardening (docs/serving.md, "Limits" and "Security").
    max_request_bytes: int = 2 * 1024 * 1024  # larger bodies are refused (413) before they are parsed
    drain_timeout: float = 30.0  # seconds SIGTERM waits for running requests before ending them
    allow_special_tokens_in_content: bool = False  # True: special-token strings in messages stay special
    allowed_origins: list[str] = field(default_factory=list)  # CORS; none by default
    # Scale-out (Ray Serve); 1 replica runs in-process without Ray.
    gpus: int = 0
    replicas: int = 1
    ray_address: str | None = None


def add_engine_arguments(parser) -> None:
    """Flags shared by every command that loads a model (generate, eval, serve, bench engine)."""
    g = parser.add_argument_group("model and engine")
    g.add_argument(
        "--model-path",
        default=str(DEFAULT_MODEL),
        help="checkpoint directory or hub id in the local HF cache",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and activations (auto: bfloat16 on CUDA, float32 on the CPU)",
    )
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    g.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "fast-dllm", "dinfer", "nemotron", "nemotron-labs", "sdar", "dream", "llada2"],
        help="engine whose default preset is used (auto: by model family)",
    )
    g.add_argument(
        "--algorithm",
        "--generation-algorithm",
        dest="algorithm",
        default=None,
        help="default decoding preset (None: the engine's; `dllm-serve models --model-path M` lists them)",
    )
    g.add_argument(
        "--load-format",
        default="safetensors",
        choices=["safetensors", "dummy"],
        help="dummy: random weights from config.json alone (benchmarks of real shapes)",
    )
    g.add_argument(
        "--max-batch-size",
        "--batch-size",
        dest="max_batch_size",
        type=int,
        default=32,
        help="sequences decoded together at most",
    )
    g.add_argument("--max-num-tokens", type=int, default=65536, help="token budget of the running batch")
    g.add_argument(
        "--max-wait-time",
        type=float,
        default=0.0,
        help="seconds to wait for more arrivals before a step when the batch is not full",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + canvas of one request (None: the model's); the KV cache must hold one",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="CUDA: fraction of device memory for weights, activations and the KV cache",
    )
    g.add_argument(
        "--kv-cache-memory",
        default=None,
        help="KV-cache bytes, e.g. 2GiB (None: measured on CUDA, 2GiB on the CPU; docs/memory.md)",
    )
    g.add_argument(
        "--prompt-cache-memory",
        default=None,
        help="bytes of the KV budget kept for reused prompt blocks of block-causal models, e.g. 4GiB; "
        "0 turns reuse off (None: a tenth of the KV budget; docs/memory.md)",
    )
    g.add_argument(
        "--dcp-path", default=None, help="serve a torch.distributed.checkpoint (NeMo-RL) checkpoint"
    )
    g.add_argument("--base-model", default=None, help="config and tokenizer for --dcp-path")
    g.add_argument(
        "--dcp-cache-dir",
        default=None,
        help="cache of converted DCP checkpoints (None: $DLLM_SERVE_CACHE or ~/.cache/dllm-serve/dcp)",
    )
    g.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a checkpoint's own modeling code",
    )
    g.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay cached block steps as CUDA graphs (CUDA only; see docs/serving.md)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads in each model process (None: $OMP_NUM_THREADS if set, else the "
        "cores this process may use divided among the replicas on this machine)",
    )


def engine_config_from_args(args) -> EngineConfig:
    return EngineConfig(
        model_path=args.model_path,
        dtype=args.dtype,
        device=args.device,
        engine=args.engine,
        algorithm=args.algorithm,
        load_format=args.load_format,
        max_batch_size=args.max_batch_size,
        max_num_tokens=args.max_num_tokens,
        max_wait_time=args.max_wait_time,
        max_queue=getattr(args, "max_queue", 1024),
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory=args.kv_cache_memory,
        prompt_cache_memory=args.prompt_cache_memory,
        dcp_path=args.dcp_path,
        base_model=args.base_model,
        dcp_cache_dir=args.dcp_cache_dir,
        trust_remote_code=args.trust_remote_code,
        cuda_graphs=args.cuda_graphs,
        threads=args.threads,
    )
