"""Micro-benchmark of the int8 weight-only matmul candidates at a model's own shapes.

For each projection (qkv, o, gate/up, down, lm_head) and activation row count, the median
time of: the dense matmul in the activation dtype (the unquantized model),
``torch._weight_int8pack_mm`` (bf16 activations: inputs of other dtypes are cast around
it, the cast included), convert-then-matmul (:func:`engine.quantization.dequant_matmul`)
and :class:`engine.quantization.Int8Linear` itself (whichever of the two the policy picks).
Used by ``python -m benchmarks.quantization`` (the ``micro`` block of its JSON).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from engine import quantization as q
from engine.model_config import ModelConfig


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """``{name: (out_features, in_features)}`` of one layer's projections and lm_head."""
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    return {
        "qkv": (q_size + 2 * kv_size, hidden),
        "o": (hidden, q_size),
        "gate_up": (2 * inter, hidden),
        "down": (hidden, inter),
        "lm_head": (cfg.vocab_size, hidden),
    }


def _median_us(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e6


def _candidates(
    x: torch.Tensor, weight: torch.Tensor, layer: q.Int8Linear
) -> dict[str, Callable[[], object]]:
    dense = weight.to(x.dtype)
    return {
        "dense": lambda: F.linear(x, dense),
        q.KERNEL_PACKED: lambda: torch._weight_int8pack_mm(
            x.to(torch.bfloat16), layer.weight_int8, layer.scales_bf16
        ).to(x.dtype),
        q.KERNEL_DEQUANT: lambda: q.dequant_matmul(x, layer.weight_int8, layer.scales, None),
        "Int8Linear": lambda: layer(x),
    }


def run(
    cfg: ModelConfig, dtypes: list[torch.dtype], rows: list[int], reps: int
) -> list[dict[str, Any]]:
    """One record per (dtype, rows, shape): microseconds per candidate and the policy's pick."""
    gen = torch.Generator().manual_seed(0)
    records = []
    for name, (out_f, in_f) in model_shapes(cfg).items():
        weight = torch.randn(out_f, in_f, generator=gen) * 0.02
        layer = q.Int8Linear.from_linear(_linear(weight))
        shape_reps = max(3, reps // 8) if name == "lm_head" else reps
        for dtype in dtypes:
            for n in rows:
                x = torch.randn(n, in_f, generator=gen).to(dtype)
                times = {
                    k: _median_us(fn, shape_reps) for k, fn in _candidates(x, weight, layer).items()
                }
                records.append(
                    {
                        "shape": name,
                        "out_in": [out_f, in_f],
                        "dtype": str(dtype).removeprefix("torch."),
                        "rows": n,
                        "us": times,
                        "policy": layer.kernel(n),
                        "speedup_vs_dense": times["dense"] / times["Int8Linear"],
                    }
                )
    return records


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    return linear


def table_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows for :func:`benchmarks._common.print_table` under :data:`HEADERS`."""
    return [
        [
            r["shape"],
            r["dtype"],
            r["rows"],
            r["us"]["dense"],
            r["us"][q.KERNEL_PACKED],
            r["us"][q.KERNEL_DEQUANT],
            r["policy"],
            r["speedup_vs_dense"],
        ]
        for r in records
    ]


HEADERS = ["shape", "dtype", "rows", "dense us", "int8pack us", "convert+mm us", "pick", "x dense"]
