"""Serve training checkpoints saved with torch.distributed.checkpoint (DCP): convert once, cache, reuse.

A DCP checkpoint is a directory of ``.distcp`` shards plus a pickled ``.metadata`` that lists every
tensor's global shape, dtype and where its chunks live. We read that metadata with no process group,
map the checkpoint's keys onto the base model's official weight names (NeMo-RL wraps them in
``model.``), and stream the tensors into safetensors in small batches, so conversion needs about one
batch of memory, not the model. The result sits in a cache keyed by the checkpoint's identity, written
to a temporary directory and renamed into place under a file lock, so N replicas that start together
convert once and nobody ever sees a half-written directory.

Damage is refused, never served: a shard that does not decode is named in a one-line
``DCPCheckpointError`` (torch's own ``CheckpointException`` derives from ``BaseException`` and is
turned into it here), a tensor holding NaN or Inf is an error, and the provenance marker records
every output file's size and SHA-256 so a cache entry changed after conversion is converted again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from tqdm.auto import tqdm

from dllm_serve.checkpoints.layout import METADATA, CheckpointLayout, DCPCheckpointError, find_layout
from dllm_serve.checkpoints.safetensors_writer import (
    StreamingSafetensorsWriter,
    TensorSpec,
    plan_shards,
    shard_file_names,
    write_index,
)
from dllm_serve.models.loader import DTYPES, one_line, resolve_model_path

__all__ = [
    "CacheEntry",
    "DCPCheckpointError",
    "cache_entry",
    "convert_checkpoint",
    "default_cache_dir",
    "ensure_converted",
    "map_checkpoint",
]

log = logging.getLogger(__name__)

CONVERTER_VERSION = 2  # 2: the marker records each output file's size and SHA-256
MAX_SHARD_BYTES = 5 * 1000**3  # Hugging Face's "5GB" shard limit
READ_BATCH_BYTES = 256 * 2**20  # tensors read from the DCP files per dcp.load call
HASH_CHUNK_BYTES = 16 * 2**20
FINITE_CHUNK = 16 * 2**20  # elements checked for NaN/Inf at a time
MARKER = "dcp_conversion.json"  # provenance, written last inside the temporary directory

# First key components of training state that is not the model (optimizer, schedulers, RNG...).
NON_MODEL_ROOTS = frozenset(
    {
        "optim",
        "optimizer",
        "optimizers",
        "optimizer_state",
        "lr_scheduler",
        "scheduler",
        "schedulers",
        "rng",
        "rng_state",
        "rng_states",
        "dataloader",
        "data_loader",
        "sampler",
        "trainer",
        "train_state",
        "step",
        "epoch",
    }
)
# Buffers some training modules persist that no inference checkpoint carries.
IGNORED_SUFFIXES = (".inv_freq", "._extra_state")
# Output heads a training state dict repeats when tied to the embedding; a tied base model has none.
TIED_HEAD_NAMES = ("lm_head.weight", "transformer.ff_out.weight", "output.weight")
# Module wrappers that leak into parameter names (torch.compile, FSDP1, activation checkpointing).
WRAPPER_PARTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "chat_template")

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorMapping:
    target: str  # official name in the base model
    source: str  # key in the DCP checkpoint
    shape: tuple[int, ...]
    dtype: torch.dtype  # as stored in the checkpoint


@dataclass(frozen=True)
class CheckpointMap:
    tensors: list[TensorMapping]  # in output order
    prefix: str  # stripped from checkpoint keys ("" or e.g. "model.")
    ignored: int  # non-model entries skipped (optimizer, RNG, bytes)


# -- names and shapes ---------------------------------------------------------------------------


def _natural_key(name: str) -> list[Any]:
    """Sort layer 2 before layer 10, so shards group whole layers."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def base_weight_specs(base_dir: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Official tensor names and shapes of the base model, read from safetensors headers only.

    A base directory without weights (config and tokenizer only) falls back to the native model built
    on the meta device, whose ``export_state_dict`` names are the official ones.
    """
    from safetensors import safe_open

    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (base_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return _native_specs(base_dir)
    specs: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    for fname in files:
        with safe_open(str(base_dir / fname), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = f.get_slice(name)
                specs[name] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype()))
    return specs


def _native_specs(base_dir: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    from dllm_serve.models import registry
    from dllm_serve.models.tokenizer import ChatTokenizer

    config = json.loads((base_dir / "config.json").read_text())
    spec = registry.get(registry.detect_family(config))
    with torch.device("meta"):
        model = spec.build(config, ChatTokenizer(base_dir))
    log.info("base model %s has no weights; using the %s model's official names", base_dir, spec.name)
    return {n: (tuple(t.shape), None) for n, t in model.export_state_dict().items()}


def read_metadata(weights_dir: Path) -> Any:
    """The checkpoint's DCP metadata, or a clear error for a truncated or foreign file."""
    try:
        metadata = FileSystemReader(str(weights_dir)).read_metadata()
    except Exception as exc:
        raise DCPCheckpointError(
            f"cannot read {weights_dir / METADATA} ({type(exc).__name__}: {exc}); the checkpoint is "
            "truncated, still being written, or not a torch.distributed.checkpoint"
        ) from exc
    if not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise DCPCheckpointError(f"{weights_dir / METADATA} is not torch.distributed.checkpoint metadata")
    return metadata


def _strip_wrappers(key: str) -> str:
    for part in WRAPPER_PARTS:
        key = key.replace(part, "")
    return key


def map_checkpoint(
    metadata: Any, base: dict[str, tuple[tuple[int, ...], torch.dtype | None]], *, tied: bool = False
) -> CheckpointMap:
    """Match checkpoint keys to the base model's names: one common prefix, every name, every shape."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = metadata.state_dict_metadata
    tensors = {k: md for k, md in entries.items() if isinstance(md, TensorStorageMetadata)}
    cleaned = {_strip_wrappers(k): k for k in tensors}

    votes: Counter[str] = Counter()
    for key in cleaned:
        parts = key.split(".")
        if parts[0] in NON_MODEL_ROOTS:  # optimizer state is often keyed by parameter names too
            continue
        for i in range(len(parts)):
            if ".".join(parts[i:]) in base:
                votes[".".join(parts[:i]) + ("." if i else "")] += 1
                break
    if not votes:
        raise DCPCheckpointError(
            "no tensor in the checkpoint matches a weight of the base model; is --base-model the model "
            f"that was trained? checkpoint keys: {_first(sorted(cleaned))}; base model names: "
            f"{_first(sorted(base, key=_natural_key))}"
        )
    prefix = max(votes, key=lambda p: (votes[p], -len(p)))

    mapped: dict[str, TensorMapping] = {}
    unexpected: list[str] = []
    shapes: list[str] = []
    wrong_shape: set[str] = set()
    ignored = len(entries) - len(tensors)
    for key, original in cleaned.items():
        name = key[len(prefix) :]
        if not key.startswith(prefix) or (name not in base and key.split(".", 1)[0] in NON_MODEL_ROOTS):
            ignored += 1
            continue
        if name not in base:
            if name.endswith(IGNORED_SUFFIXES) or (tied and name.endswith(TIED_HEAD_NAMES)):
                ignored += 1
            else:
                unexpected.append(original)
            continue
        shape = tuple(tensors[original].size)
        if shape != base[name][0]:
            shapes.append(f"{name}: checkpoint {list(shape)} vs base {list(base[name][0])}")
            wrong_shape.add(name)
            continue
        mapped[name] = TensorMapping(name, original, shape, tensors[original].properties.dtype)
    missing = [n for n in sorted(base, key=_natural_key) if n not in mapped and n not in wrong_shape]
    unexpected.sort(key=_natural_key)
    shapes.sort(key=_natural_key)
    if unexpected or shapes or missing:
        lines = [f"checkpoint does not match the base model (checkpoint key prefix {prefix!r}):"]
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {_first(shapes)}")
        if missing:
            lines.append(
                f"  base model weights missing from the checkpoint ({len(missing)}): {_first(missing)}"
            )
        if unexpected:
            lines.append(
                f"  checkpoint tensors the base model lacks ({len(unexpected)}): {_first(unexpected)}"
            )
        raise DCPCheckpointError("\n".join(lines))
    order = sorted(mapped, key=_natural_key)
    return CheckpointMap([mapped[n] for n in order], prefix, ignored)


def _first(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def check_storage(weights_dir: Path, metadata: Any, keys: set[str]) -> None:
    """Every file the wanted tensors live in exists and is long enough (catches truncated copies)."""
    needed: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        if getattr(index, "fqn", None) in keys and hasattr(info, "relative_path"):
            end = int(info.offset) + int(info.length)
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for rel, end in sorted(needed.items()):
        path = weights_dir / rel
        if not path.is_file():
            raise DCPCheckpointError(f"checkpoint file {path} is missing (listed in {METADATA})")
        size = path.stat().st_size
        if size < end:
            raise DCPCheckpointError(
                f"checkpoint file {path} is truncated: {size} bytes, its metadata needs at least {end}"
            )


# -- conversion ---------------------------------------------------------------------------------


def _out_dtype(src: torch.dtype, dtype: str | None) -> torch.dtype:
    return DTYPES[dtype] if dtype and src.is_floating_point else src


def _batches(items: list[TensorMapping], limit: int) -> Iterator[list[TensorMapping]]:
    batch: list[TensorMapping] = []
    size = 0
    for item in items:
        nbytes = TensorSpec(item.source, item.shape, item.dtype).nbytes
        if batch and size + nbytes > limit:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += nbytes
    if batch:
        yield batch


class _ShardError(Exception):
    """A read that failed inside one ``.distcp`` file (carried out of DCP's exception wrapper)."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        # torch.load's own text for undecodable bytes is about its weights_only default: misleading.
        why = type(cause).__name__ if isinstance(cause, pickle.UnpicklingError) else one_line(cause)
        super().__init__(
            f"checkpoint file {path} is damaged: a stored tensor does not decode ({why}); "
            "the file changed after it was saved"
        )


class _FileNamingReader(FileSystemReader):
    """DCP's file reader, reading one file at a time so that a failure names the file."""

    def read_data(self, plan: Any, planner: Any) -> Any:
        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        done = None
        for rel, items in per_file.items():
            try:
                done = super().read_data(replace(plan, items=items), planner)
                done.wait()
            except Exception as exc:
                raise _ShardError(Path(self.path) / rel, exc) from exc
        return done if done is not None else super().read_data(plan, planner)


def _read_tensors(weights_dir: Path, batch: list[TensorMapping]) -> dict[str, torch.Tensor]:
    """Load whole (resharded) tensors for a batch of keys, with no process group."""
    import torch.distributed.checkpoint as dcp

    buffers = {m.source: torch.empty(m.shape, dtype=m.dtype) for m in batch}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(buffers, storage_reader=_FileNamingReader(str(weights_dir)), no_dist=True)
    except CheckpointException as exc:  # a BaseException: DCP's wrapper around each rank's failure
        causes = [failure[0] for failure in exc.failures.values()]
        cause = causes[0] if causes else exc
        if isinstance(cause, _ShardError):
            raise DCPCheckpointError(str(cause)) from None
        raise DCPCheckpointError(f"reading tensors from {weights_dir} failed: {one_line(cause)}") from None
    except _ShardError as exc:
        raise DCPCheckpointError(str(exc)) from None
    except Exception as exc:
        raise DCPCheckpointError(f"reading tensors from {weights_dir} failed: {one_line(exc)}") from exc
    return buffers


def _check_finite(tensor: torch.Tensor, name: str, weights_dir: Path) -> None:
    """NaN or Inf in a weight is a broken training run or a damaged file; never serve it."""
    if not tensor.is_floating_point():
        return
    flat = tensor.reshape(-1)
    chunks = range(0, flat.numel(), FINITE_CHUNK)  # a bool mask of the 1 GiB embedding at once is 0.5 GB
    if not all(bool(torch.isfinite(flat[i : i + FINITE_CHUNK]).all()) for i in chunks):
        bad = sum(int((~torch.isfinite(flat[i : i + FINITE_CHUNK])).sum()) for i in chunks)
        raise DCPCheckpointError(
            f"tensor {name} in {weights_dir} holds {bad} NaN/Inf value(s) of {tensor.numel()}; "
            "the checkpoint is damaged or the training diverged"
        )


def file_digests(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file in a converted directory but the marker itself."""
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.name != MARKER:
            digest = hashlib.sha256()
            with f.open("rb") as fh:
                while chunk := fh.read(HASH_CHUNK_BYTES):
                    digest.update(chunk)
            out[f.name] = {"bytes": f.stat().st_size, "sha256": digest.hexdigest()}
    return out


def verify_files(directory: Path) -> str | None:
    """Why a converted directory no longer matches its marker (None when every file does)."""
    try:
        recorded = json.loads((directory / MARKER).read_text()).get("files")
    except (OSError, ValueError) as exc:
        return f"{directory / MARKER} is unreadable ({one_line(exc)})"
    if not isinstance(recorded, dict) or not recorded:
        return f"{directory / MARKER} records no file digests"
    present = {f.name for f in directory.iterdir() if f.is_file() and f.name != MARKER}
    if present != set(recorded):
        changed = sorted(present ^ set(recorded))
        return f"files added or removed since conversion: {', '.join(changed[:5])}"
    for name, want in sorted(recorded.items()):
        size = (directory / name).stat().st_size
        if size != want.get("bytes"):
            return f"{directory / name} is {size} bytes, {want.get('bytes')} when converted"
    for name, want in file_digests(directory).items():
        if want["sha256"] != recorded[name].get("sha256"):
            return f"{directory / name} changed since conversion (SHA-256 differs)"
    return None


def _copy_support_files(base_dir: Path, tokenizer_dir: Path | None, out: Path) -> None:
    """config.json and friends from the base model; the tokenizer from the checkpoint when it has one."""
    for f in sorted(base_dir.iterdir()):
        skip_tokenizer = tokenizer_dir is not None and f.name.startswith(TOKENIZER_PREFIXES)
        if (
            f.is_file()
            and not f.name.endswith(WEIGHT_SUFFIXES)
            and not f.name.endswith(".index.json")
            and f.name != MARKER
            and not skip_tokenizer
        ):
            shutil.copy(f, out / f.name)
    if tokenizer_dir is not None:
        for f in sorted(tokenizer_dir.iterdir()):
            if f.is_file():
                shutil.copy(f, out / f.name)


def _write_converted(
    layout: CheckpointLayout,
    base_dir: Path,
    out: Path,
    *,
    dtype: str | None,
    max_shard_bytes: int,
    show_progress: bool,
    identity: str | None = None,
) -> None:
    """Fill the empty directory ``out`` with safetensors, config, tokenizer and the provenance marker."""
    started = time.monotonic()
    metadata = read_metadata(layout.weights_dir)
    config = json.loads((base_dir / "config.json").read_text())
    tied = bool(config.get("tie_word_embeddings") or config.get("weight_tying"))
    cmap = map_checkpoint(metadata, base_weight_specs(base_dir), tied=tied)
    check_storage(layout.weights_dir, metadata, {m.source for m in cmap.tensors})

    specs = [TensorSpec(m.target, m.shape, _out_dtype(m.dtype, dtype)) for m in cmap.tensors]
    by_target = {m.target: m for m in cmap.tensors}
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_file_names(len(shards))
    total = sum(s.nbytes for s in specs)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"converting {layout.name}",
        disable=not show_progress,
    ) as bar:
        for group, fname in zip(shards, names, strict=True):
            with StreamingSafetensorsWriter(out / fname, group) as writer:
                for batch in _batches([by_target[s.name] for s in group], READ_BATCH_BYTES):
                    loaded = _read_tensors(layout.weights_dir, batch)
                    for m in batch:
                        tensor = loaded.pop(m.source).to(_out_dtype(m.dtype, dtype))
                        _check_finite(tensor, m.source, layout.weights_dir)
                        writer.write(m.target, tensor)
                        bar.update(tensor.nbytes)
                        del tensor
    if len(shards) > 1:
        write_index(out, shards, names)
    _copy_support_files(base_dir, layout.tokenizer_dir, out)
    provenance = {
        "converter_version": CONVERTER_VERSION,
        "source": str(layout.weights_dir),
        "layout": layout.kind,
        "tokenizer": str(layout.tokenizer_dir) if layout.tokenizer_dir else "base model",
        "base_model": str(base_dir),
        "key_prefix": cmap.prefix,
        "tensors": len(specs),
        "ignored_entries": cmap.ignored,
        "bytes": total,
        "shards": len(shards),
        "dtype": dtype or "as saved",
        "identity": identity,
        "seconds": round(time.monotonic() - started, 3),
        "files": file_digests(out),
    }
    (out / MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
    log.info(
        "converted %d tensors (%.1f MB, %d file(s), key prefix %r, %d non-model entries ignored) in %.1fs",
        len(specs),
        total / 1e6,
        len(shards),
        cmap.prefix,
        cmap.ignored,
        time.monotonic() - started,
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _build_then_rename(final: Path, fill: Callable[[Path], None], *, replace: bool = False) -> None:
    """Run ``fill(tmp)`` in a fresh sibling directory and rename it to ``final``; never leave a half."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    old: Path | None = None
    try:
        fill(tmp)
        _fsync_dir(tmp)
        if replace and final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert_checkpoint(
    dcp_path: str | os.PathLike[str],
    base_model: str,
    output: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    show_progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Convert a DCP checkpoint into ``output`` (a model directory the normal loader reads)."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    layout = find_layout(dcp_path)
    base_dir = resolve_model_path(base_model).resolve()
    final = Path(output).expanduser().resolve()
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass --force to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    log.info(
        "converting %s (%s layout, base model %s) into %s", layout.weights_dir, layout.kind, base_dir, final
    )
    _build_then_rename(
        final,
        lambda tmp: _write_converted(
            layout, base_dir, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes, show_progress=show_progress
        ),
        replace=overwrite,
    )
    return final


# -- cache --------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$DLLM_SERVE_CACHE, else ~/.cache/dllm-serve/dcp."""
    env = os.environ.get("DLLM_SERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dllm-serve" / "dcp"


def checkpoint_identity(layout: CheckpointLayout, base_dir: Path, dtype: str | None) -> str:
    """Hash of what the conversion depends on: paths, .metadata size and mtime, tokenizer, base config."""

    def stat(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]

    tokenizer = None
    if layout.tokenizer_dir is not None:
        tokenizer = [[f.name, *stat(f)] for f in sorted(layout.tokenizer_dir.iterdir()) if f.is_file()]
    ident = {
        "converter_version": CONVERTER_VERSION,
        "weights": str(layout.weights_dir),
        "metadata": stat(layout.weights_dir / METADATA),
        "tokenizer": tokenizer,
        "base_model": str(base_dir.resolve()),
        "base_config": stat(base_dir / "config.json"),
        "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    layout: CheckpointLayout
    base_dir: Path
    identity: str
    path: Path  # the converted model directory
    lock: Path  # flock'ed while converting into ``path``


def cache_entry(
    dcp_path: str | os.PathLike[str],
    base_model: str,
    cache_dir: str | None = None,
    *,
    dtype: str | None = None,
) -> CacheEntry:
    """Where the conversion of this checkpoint lives in the cache, and its lock file (nothing is created)."""
    layout = find_layout(dcp_path)
    base_dir = resolve_model_path(base_model).resolve()
    identity = checkpoint_identity(layout, base_dir, dtype)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    name = f"{layout.name}-{identity[:16]}"
    return CacheEntry(layout, base_dir, identity, cache / name, cache / ".locks" / f"{name}.lock")


@contextmanager
def _file_lock(path: Path, what: str) -> Iterator[None]:
    """An exclusive flock; the kernel drops it if the holder dies, so a crash never wedges the cache."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # read access is enough to flock
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process converting %s (lock %s)", what, path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / "config.json").is_file()


def _reusable(entry: CacheEntry) -> bool:
    """Whether the cache entry is complete and every file still has its recorded size and SHA-256.

    An entry that no longer matches (edited, truncated, bit rot) is converted again from the
    checkpoint, which is still there: serving it would serve weights nobody trained.
    """
    if not _is_complete(entry.path):
        return False
    problem = verify_files(entry.path)
    if problem is None:
        log.info("reusing cached conversion at %s (of %s)", entry.path, entry.layout.weights_dir)
        return True
    log.warning(
        "cached conversion %s no longer matches its record (%s); converting again", entry.path, problem
    )
    return False


def ensure_converted(
    dcp_path: str,
    base_model: str,
    cache_dir: str | None = None,
    *,
    show_progress: bool = True,
    dtype: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """The cached model directory for a DCP checkpoint, converting it first if no process has yet."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    entry = cache_entry(dcp_path, base_model, cache_dir, dtype=dtype)
    layout, base_dir, final, identity = entry.layout, entry.base_dir, entry.path, entry.identity
    if _reusable(entry):
        return final
    read_metadata(layout.weights_dir)  # fail fast, before any cache entry or lock, on a broken checkpoint
    entry.lock.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(entry.lock, str(layout.weights_dir)):
        if _reusable(entry):
            return final
        for stale in final.parent.glob(f".tmp-{final.name}-*"):  # left by a process that died mid-conversion
            shutil.rmtree(stale, ignore_errors=True)
        log.info(
            "converting %s (%s layout, base model %s) into %s",
            layout.weights_dir,
            layout.kind,
            base_dir,
            final,
        )
        # replace=True: a stale or damaged entry is swapped out only once the new one is complete.
        _build_then_rename(
            final,
            lambda tmp: _write_converted(
                layout,
                base_dir,
                tmp,
                dtype=dtype,
                max_shard_bytes=max_shard_bytes,
                show_progress=show_progress,
                identity=identity,
            ),
            replace=True,
        )
    return final
