"""Test-wide environment: offline, loopback, model cache, and Triton's interpreter on CPU.

This runs before any test module imports torch, transformers or triton, which matters:
Triton fixes interpreted-vs-compiled mode when it is first imported.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.env import apply_offline_defaults

os.environ.setdefault("PDSERVE_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache"))
apply_offline_defaults()  # the same offline / loopback defaults every entry point sets

import torch  # noqa: E402  (after the environment above)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread per test process: the suite starts worker processes beside it, and
# oversubscribed OpenMP threads spin instead of working.
torch.set_num_threads(int(os.environ.get("PDSERVE_TEST_THREADS", "1")))
