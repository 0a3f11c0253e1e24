"""Test-wide settings.

The CI machine has 2 cores and the tests run a client and one or more servers at once, so every
process (servers started by tests inherit the environment) uses one intra-op thread: with more,
PyTorch's threads oversubscribe the cores and a tiny forward slows down 30-fold.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
