"""One rank of a 2-process DCP save in NeMo-RL's layout (gloo on CPU), run by tests/integration/test_dcp.py.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python dcp_sharded_save.py MODEL_DIR STEP_DIR

Every weight becomes a DTensor sharded on dim 0 over a 2-rank CPU mesh, so each rank writes only its
half (``__0_0.distcp`` and ``__1_0.distcp``). As NeMo-RL does, the model state is saved under a
``model`` entry (keys ``model.<HF name>``) to ``STEP_DIR/policy/weights``, optimizer state to
``policy/optimizer``, and the tokenizer to ``policy/tokenizer``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main(model_dir: Path, step_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    weights = load_file(str(model_dir / "model.safetensors"))
    sharded = {name: distribute_tensor(t, mesh, [Shard(0)]) for name, t in sorted(weights.items())}
    # An HF model wrapped as NeMo-RL's policy: its state dict sits under "model".
    dcp.save(
        {"model": dict(sharded)},
        checkpoint_id=step_dir / "policy" / "weights",
    )
    exp_avg = {name: torch.zeros_like(t) for name, t in sharded.items()}
    dcp.save(
        {"optim": {"state": exp_avg, "step": 7}}, checkpoint_id=step_dir / "policy" / "optimizer" / "optim"
    )
    if rank == 0:
        tokenizer = step_dir / "policy" / "tokenizer"
        tokenizer.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            shutil.copy(model_dir / name, tokenizer / name)
        (step_dir / "training_info.json").write_text(json.dumps({"step": int(step_dir.name.split("_")[-1])}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
