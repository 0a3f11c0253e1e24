"""The server-info file: one JSON document per SLURM job saying where its server is and how it is doing.

``submit`` writes it as ``pending``; the job itself moves it to ``starting``, ``ready`` or ``failed``
(with the reason); ``stop`` or the job's own shutdown marks it ``stopped``. Writers replace the file
atomically (write a sibling, then rename), so a reader never sees half a document.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

STATUSES = ("pending", "starting", "ready", "failed", "stopped")
FINAL_STATUSES = ("failed", "stopped")
INFO_PREFIX = "dllm-serve-"


def info_path(output_dir: str | Path, job_id: str | int) -> Path:
    """Where the job with ``job_id`` keeps its info file inside ``output_dir``."""
    return Path(output_dir) / f"{INFO_PREFIX}{job_id}.json"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_info(path: str | Path) -> dict[str, Any] | None:
    """The document at ``path``, or None when it does not exist (yet)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    return json.loads(text) if text.strip() else None


def write_info(path: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the document at ``path`` and replace it atomically.

    A status change stamps ``<status>_at`` (e.g. ``ready_at``) and ``updated_at``.
    """
    path = Path(path)
    doc = read_info(path) or {}
    status = fields.get("status")
    if status is not None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        doc.setdefault("timestamps", {})[f"{status}_at"] = now_iso()
    doc.update(fields)
    doc["updated_at"] = now_iso()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return doc


def create_pending(path: str | Path, **fields: Any) -> bool:
    """Write the first ``pending`` document unless the job already wrote its own (it may start first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    # Between the exclusive create and this write the job can only have replaced the file, never
    # appended to it: merging keeps whatever it wrote, and only a still-empty file gets the status.
    current = read_info(path) or {}
    if current.get("status"):
        write_info(path, **{k: v for k, v in fields.items() if k not in current})
    else:
        write_info(path, status="pending", **fields)
    return True
