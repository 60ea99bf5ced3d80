"""Triton int8 weight-only GEMM / GEMV: ``out = (x @ W_int8.T) * scale[None, :] + bias``.

Used on CUDA by :class:`engine.quantization.Int8Linear` (imported lazily there, so CPU
installs never need triton). ``x`` is ``(M, K)`` fp16 / bf16 / fp32; ``W`` is the
``(N, K)`` int8 weight of :func:`engine.quantization.quantize_per_channel` and ``scale``
its fp32 per-output-channel scales. Each program computes one ``(BLOCK_M, BLOCK_N)`` tile
of the output: it streams ``BLOCK_K``-wide slices of ``x`` and of the int8 weight (a
quarter / half of the bytes of an fp32 / 16-bit weight: the point at decode batch sizes,
where the matmul is bound by reading the weight), converts the weight slice to the
activation dtype in registers (exact: |values| <= 127), accumulates in fp32, and applies
the scales and the bias once, to the accumulator.

Tests run it on CPU tensors under ``TRITON_INTERPRET=1`` (tests/unit/
test_quantization_triton.py), which triton reads when ``@triton.jit`` decorates a function,
i.e. when this module is first imported.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "engine.triton_int8 needs triton (installed with any CUDA torch, or the 'dev' "
        "extra); on CPU engine.quantization uses torch kernels instead"
    ) from exc

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _int8_matmul_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    s_xm, s_xk, s_wn, s_wk, s_om, s_on,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``: one output tile per program."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        x = tl.load(
            x_ptr + rows[:, None] * s_xm + k[None, :] * s_xk,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        # (BLOCK_K, BLOCK_N) slice of W.T, loaded as int8 and widened in registers.
        w = tl.load(
            w_ptr + cols[None, :].to(tl.int64) * s_wn + k[:, None] * s_wk,
            mask=col_ok[None, :] & k_ok[:, None],
            other=0,
        )
        if UPCAST:  # fp32 activations (exact products), or bf16 in the interpreter
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:  # 16-bit tensor-core dot; int8 -> fp32 -> 16-bit is exact
            acc = tl.dot(x, w.to(tl.float32).to(x.dtype), acc)
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    acc = acc * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None] * s_om + cols[None, :] * s_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) computes bf16 ``tl.dot`` wrongly
# (numpy has no bf16), so there bf16 tiles are multiplied in fp32: same result, up to the
# rounding of the products. Compiled kernels take the bf16 tensor-core path.
INTERPRETED = type(_int8_matmul_kernel).__name__ == "InterpretedFunction"


def block_sizes(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for ``m`` activation rows: a thin tile for decode-sized
    batches (``tl.dot`` needs at least 16 rows; the padding rows are masked), wider for
    prefill chunks."""
    if m <= 16:
        return 16, 64, 128
    if m <= 64:
        return 32, 64, 64
    return 64, 64, 64


def int8_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ (values * scales[:, None]).T + bias`` in ``x``'s dtype, ``x`` of shape (M, K)."""
    if x.dim() != 2 or values.dim() != 2 or x.shape[1] != values.shape[1]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)} @ W {tuple(values.shape)}.T")
    if x.dtype not in _SUPPORTED:
        raise ValueError(f"activation dtype {x.dtype} is not one of {_SUPPORTED}")
    if values.dtype != torch.int8:
        raise ValueError(f"weight must be int8, got {values.dtype}")
    m, k = x.shape
    n = values.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    scales = scales.float().contiguous()
    block_m, block_n, block_k = block_sizes(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int8_matmul_kernel[grid](
        x, values, scales, bias if bias is not None else scales, out,
        m, n, k,
        x.stride(0), x.stride(1), values.stride(0), values.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        UPCAST=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and INTERPRETED),
    )  # fmt: skip
    return out
