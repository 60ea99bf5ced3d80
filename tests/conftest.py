"""Test-wide environment: offline, loopback, and Triton's interpreter on CPU.

This runs before any test module imports torch, transformers or triton, which matters:
Triton fixes interpreted-vs-compiled mode when it is first imported. The model cache is the
one every entry point uses (``common.env.cache_dir()``: ``$PDSERVE_CACHE_DIR`` or
``~/.cache/pdserve``).
"""

from __future__ import annotations

import os

from common.env import apply_offline_defaults

apply_offline_defaults()  # the same offline / loopback defaults every entry point sets

import torch  # noqa: E402  (after the environment above)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread per test process: the suite starts worker processes beside it, and
# oversubscribed OpenMP threads spin instead of working.
torch.set_num_threads(int(os.environ.get("PDSERVE_TEST_THREADS", "1")))
