"""KV cache quantization: fp8 (e4m3) or int8 K/V with a float32 scale beside every row.

``EngineConfig.kv_cache_dtype`` picks the format: ``"auto"`` stores K/V in the model's dtype
(no quantization), ``"fp8"`` and ``"int8"`` store each row (one token's K, or V, for one KV
head: ``head_dim`` values) as ``head_dim`` one-byte codes followed by its float32 scale,
``amax(|row|) / QMAX`` — so a row of the cache is ``head_dim + 4`` bytes wide.

Scale granularity: per token, per layer, per K/V, per KV head. Finer than per block, it
needs no re-quantization when a decode step writes one more token into a half-full block,
and costs 4 bytes per 64 codes (head_dim 64: 68 bytes a row against 128 in bf16, 0.53×).

Keeping the scale *in* the row means everything that moves blocks as bytes — block copy
(prefix cache, engine/block_copy.py), KV transfer packing, segments and landing — moves
the scales with the codes, with no second tensor to keep in step.

The storage dtype names the format, so attention needs no extra argument: ``torch.int8``
rows are int8 codes, ``torch.uint8`` rows are fp8 e4m3 codes (kept as bytes: float8
tensors lack index ops on some backends). The layout's dtype name is ``"int8"`` or
``"fp8_e4m3"``; two peers' caches are compatible only if these names match
(common/kv_compat.py), so an fp8 prefill worker never ships blocks to a bf16 decode worker.
"""

from __future__ import annotations

import functools

import torch

from common.kv_compat import FP8_E4M3 as FP8  # layout dtype names of the quantized formats
from common.kv_compat import INT8, SCALE_BYTES
from common.kv_compat import QUANTIZED_KV_DTYPES as QUANTIZED

_STORAGE = {FP8: torch.uint8, INT8: torch.int8}
_KIND = {torch.uint8: FP8, torch.int8: INT8}
_QMAX = {FP8: 448.0, INT8: 127.0}  # largest finite code magnitude
# An all-zero row keeps a positive scale (no 0 / 0). The smallest normal float32, not a
# larger epsilon: a clamp at 1e-12 flushed every row with |x| below ~1e-10 to zeros.
_MIN_SCALE = torch.finfo(torch.float32).tiny


def layout_dtype(kv_cache_dtype: str, model_dtype: str) -> str:
    """The KV layout's dtype name for an engine option: the model's dtype for "auto"."""
    if kv_cache_dtype == "auto":
        return model_dtype
    return {"fp8": FP8, "int8": INT8}[kv_cache_dtype]


def is_quantized(dtype_name: str) -> bool:
    return dtype_name in QUANTIZED


def storage_dtype(dtype_name: str) -> torch.dtype:
    """The torch dtype a quantized cache is allocated in."""
    return _STORAGE[dtype_name]


def row_width(dtype_name: str, head_dim: int) -> int:
    """Elements of one stored row: ``head_dim``, plus the scale's bytes when quantized."""
    if not is_quantized(dtype_name):
        return head_dim
    if head_dim % SCALE_BYTES:
        raise ValueError(f"quantized KV needs head_dim divisible by 4, got {head_dim}")
    return head_dim + SCALE_BYTES


def kind_of(cache: torch.Tensor) -> str | None:
    """The quantized format of stored rows, or None for a plain (model-dtype) cache."""
    return _KIND.get(cache.dtype)


def check_supported(kv_cache_dtype: str, device: str | torch.device) -> None:
    """Raise ValueError, saying why, if ``kv_cache_dtype`` cannot run on ``device``."""
    if kv_cache_dtype != "fp8":
        return
    if not hasattr(torch, "float8_e4m3fn"):
        raise ValueError(
            f"kv_cache_dtype='fp8' needs torch.float8_e4m3fn (torch {torch.__version__})"
        )
    try:
        probe = torch.tensor([1.5, -3.0], device=device)
        back = probe.to(torch.float8_e4m3fn).view(torch.uint8).view(torch.float8_e4m3fn)
        ok = torch.equal(back.to(torch.float32), probe)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"kv_cache_dtype='fp8' is not supported on device {device!s}: {exc}; "
            "use kv_cache_dtype='int8' or 'auto'"
        ) from exc
    if not ok:
        raise ValueError(f"kv_cache_dtype='fp8': float8_e4m3fn round trip is wrong on {device!s}")


def quantize(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Rows ``(..., head_dim)`` of any float dtype → stored rows ``(..., head_dim + 4)``."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / _QMAX[kind]).clamp_min(_MIN_SCALE)
    scaled = xf / scale
    if kind == INT8:
        codes = scaled.round_().clamp_(-127, 127).to(torch.int8)
    else:
        codes = scaled.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    scale_bytes = scale.contiguous().view(torch.uint8).view(codes.dtype)
    return torch.cat((codes, scale_bytes), dim=-1)


def dequantize(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored rows ``(..., head_dim + 4)`` (format from their dtype) → ``(..., head_dim)``.

    The product code × scale is computed in float32 and rounded to ``dtype`` once, as it
    is stored (in bf16 the scale's own rounding would add up to two bf16 steps of error);
    int8 codes go into the multiply as they are, so that is one pass over the rows."""
    kind = kind_of(rows)
    if kind is None:
        raise ValueError(f"not a quantized KV tensor: dtype {rows.dtype}")
    head_dim = rows.shape[-1] - SCALE_BYTES
    codes = rows[..., :head_dim]
    scale = rows[..., head_dim:].contiguous().view(torch.float32)
    values = codes if kind == INT8 else _decode_codes(codes, kind, torch.float32)
    out = torch.empty(codes.shape, dtype=dtype, device=rows.device)
    return torch.mul(values, scale, out=out)


def _decode_codes(codes: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """One-byte codes → their unscaled values in ``dtype``."""
    if kind == INT8:
        return codes.to(dtype)
    if codes.device.type == "cpu":
        # torch's float8 → float cast is scalar on CPU (~4 ns a value, measured: 7 ms for a
        # batch-16 decode layer's K); a 256-entry table lookup is vectorized, ~4x faster.
        index = codes.to(torch.int32).reshape(-1)
        return _fp8_table(dtype).index_select(0, index).view(codes.shape)
    return codes.view(torch.float8_e4m3fn).to(dtype)


@functools.cache
def _fp8_table(dtype: torch.dtype) -> torch.Tensor:
    """The value of every e4m3fn bit pattern in ``dtype`` (the two NaN codes, which
    quantize never writes, read as 0)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    return torch.nan_to_num(codes.view(torch.float8_e4m3fn).to(torch.float32), nan=0.0).to(dtype)


def head_dim_of(cache: torch.Tensor) -> int:
    """The model's head_dim for a stored cache (quantized rows carry the scale too)."""
    width = cache.shape[-1]
    return width - SCALE_BYTES if kind_of(cache) else width
