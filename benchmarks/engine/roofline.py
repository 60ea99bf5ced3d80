"""The batch-1 roofline, per dtype: weight bytes / memory bandwidth bounds each decode step.

Bandwidth is the better of a tensor copy (read + write bytes) and a read (a sum), best of
5 each; decode only reads weights, so the faster figure keeps the bound a bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks._common import timed
from benchmarks.engine.runner import Measurement
from benchmarks.engine.spec import BYTES_PER_PARAM
from benchmarks.engine.systems import load_hf_model


def measure_bandwidth(mib: int, repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` copy and read bandwidth of a ``mib``-MiB fp32 tensor (bytes/s)."""
    import torch

    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page before timing
    copy_s = min(timed(lambda: dst.copy_(src))[1] for _ in range(repeats))
    read_s = min(timed(lambda: src.sum().item())[1] for _ in range(repeats))
    return {
        "tensor_bytes": src.nbytes,
        "copy_bytes_per_s": 2 * src.nbytes / copy_s,  # STREAM convention: read + write
        "read_bytes_per_s": src.nbytes / read_s,
    }


def weight_bytes(path: Path) -> dict[str, Any]:
    """Parameter count (tied embeddings once) and the weights' bytes in each dtype."""
    model = load_hf_model(path)
    params = list(model.parameters())  # deduplicated: tied embeddings appear once
    num_params = sum(p.numel() for p in params)
    del model
    return {
        "num_params": num_params,
        "weight_bytes": {dtype: num_params * size for dtype, size in BYTES_PER_PARAM.items()},
    }


def roofline(
    model_info: dict[str, Any], bw: dict[str, float], results: list[Measurement]
) -> dict[str, dict[str, Any]]:
    """Per dtype: batch-1 decode streams every weight once per token, so time per token
    >= weight bytes in that dtype / bandwidth; and each system's TPOT as a share of it.

    The best measured bandwidth is used (decode only reads weights; a copy also writes), so
    the bound stays a bound: no system can legitimately reach more than 100 % of it.
    """
    bandwidth = max(bw["copy_bytes_per_s"], bw["read_bytes_per_s"])
    out: dict[str, dict[str, Any]] = {}
    for dtype in sorted({m.dtype for m in results}):
        bound_s = model_info["weight_bytes"][dtype] / bandwidth
        fractions = {
            m.system: bound_s / m.tpot
            for m in results
            if m.workload == "batch1" and m.dtype == dtype and m.tpot
        }
        out[dtype] = {
            "bandwidth_bytes_per_s": bandwidth,
            "weight_bytes": model_info["weight_bytes"][dtype],
            "decode_s_per_token_bound": bound_s,
            "max_tok_s": 1 / bound_s,
            "fraction_of_roofline": fractions,
        }
    return out
