"""Measure peak memory (RSS) of converting a DCP checkpoint, for docs/checkpoints.md.

    python scripts/dcp_peak_memory.py [--layers 6] [--d-model 1024] [--vocab 16384] [--workdir DIR]

Saves a random LLaDA-shaped float32 checkpoint with torch.distributed.checkpoint, then converts it in
a fresh process per method and reports that process's peak RSS during the conversion: the kernel's
high-water mark (VmHWM) is reset to the current RSS after imports via /proc/self/clear_refs, since
ru_maxrss (also printed) keeps the parent's peak across fork+exec. Methods: ``dllm-serve`` (our
streaming converter) and, for reference, torch's ``format_utils.dcp_to_torch_save``, which loads the
whole state dict at once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import torch, torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from dllm_serve.checkpoints.dcp import ensure_converted
method, ckpt, base, out = sys.argv[1:5]

def status(field):  # MiB, from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

rss_start = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
    f.write("5")
t = time.monotonic()
if method == "dllm-serve":
    ensure_converted(ckpt, base, out, show_progress=False)
else:
    dcp_to_torch_save(ckpt + "/policy/weights", out + "/model.pt")
seconds = time.monotonic() - t
peak = status("VmHWM")
print(json.dumps({"method": method, "rss_before_mib": round(rss_start), "peak_rss_mib": round(peak),
                  "peak_above_start_mib": round(peak - rss_start),
                  "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "seconds": round(seconds, 1)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch
    import torch.distributed.checkpoint as dcp

    from dllm_serve.models.llada import LLaDAConfig, LLaDAModel, llada_config_dict

    work = Path(args.workdir or tempfile.mkdtemp(prefix="dcp-mem-"))
    cfg = LLaDAConfig(
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.d_model // 128,
        n_kv_heads=args.d_model // 128,
        mlp_hidden_size=args.d_model * 11 // 4,
        vocab_size=args.vocab,
        embedding_size=args.vocab,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_sequence_length=4096,
        mask_token_id=5,
        eos_token_id=1,
        pad_token_id=1,
    )
    base = work / "base"  # config and tokenizer only: names come from the native model on 'meta'
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps(llada_config_dict(cfg)))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(REPO / "models" / "tiny-llada" / name, base / name)
    with torch.device("meta"):
        names = LLaDAModel(cfg).export_state_dict()
    gen = torch.Generator().manual_seed(0)
    state = {n: torch.randn(t.shape, generator=gen) * 0.02 for n, t in names.items()}
    size = sum(t.nbytes for t in state.values())
    ckpt = work / "step_1" / "policy" / "weights"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(str(ckpt)), no_dist=True)
    del state

    results = []
    for method in ("dllm-serve", "torch dcp_to_torch_save"):
        out = work / ("out-" + method.split()[0])
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        res = subprocess.run(
            [sys.executable, "-c", MEASURE, method, str(work / "step_1"), str(base), str(out)],
            capture_output=True,
            text=True,
        )
        if res.returncode:
            sys.exit(f"{method} failed:\n{res.stderr[-3000:]}")
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(
        json.dumps(
            {
                "checkpoint_mib": round(size / 2**20),
                "tensors": len(names),
                "largest_tensor_mib": round(max(t.numel() * 4 for t in names.values()) / 2**20),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
                "torch": torch.__version__,
                "results": results,
            },
            indent=2,
        )
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
