"""Triton paged decode attention over a quantized KV cache (fp8 e4m3 or int8 rows).

The quantized twin of :func:`engine.triton_ops.paged_decode_attention`, same contract and
the same online-softmax walk over the block table; it dequantizes K and V as it loads them,
so no dequantized copy of the context is ever materialized. Row format (engine/kv_quant.py):
``head_dim`` one-byte codes, then the row's float32 scale in the next 4 bytes. The kernel
reads codes through the cache itself (int8, or uint8 holding fp8 bit patterns) and scales
through a float32 view of the same memory (row width and strides are multiples of 4 bytes:
``head_dim`` is, and the scale is 4 bytes).

fp8 codes are decoded with integer arithmetic rather than a float8 cast, so the kernel needs
no fp8 hardware and runs in triton's interpreter (tests: ``TRITON_INTERPRET=1`` on CPU):
e4m3fn is sign, 4 exponent bits (bias 7), 3 mantissa bits; a normal code's float32 bits are
``sign << 31 | (exp + 120) << 23 | mantissa << 20``, a subnormal one is ``mantissa * 2**-9``.
(The NaN code is never written: quantize clamps to the finite ±448.)

Used on CUDA by engine/attention.py when ``kv_cache_dtype`` is fp8 or int8.
"""

from __future__ import annotations

import math

import torch

from engine import kv_quant
from engine.triton_ops import _check_attention_args

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("engine.triton_kv_quant needs triton (CUDA installs have it)") from exc


@triton.jit
def _dequant(codes, FP8: tl.constexpr):
    """One-byte codes (int8, or uint8 fp8 e4m3fn bit patterns) → float32 values (unscaled)."""
    if FP8:
        c = codes.to(tl.int32) & 0xFF
        exp = (c >> 3) & 0xF
        man = c & 0x7
        normal = ((exp + 120) << 23) | (man << 20)
        subnormal = man.to(tl.float32) * 0.001953125  # 2**-9
        mag = tl.where(exp > 0, normal.to(tl.float32, bitcast=True), subnormal)
        return tl.where((c & 0x80) != 0, -mag, mag)
    return codes.to(tl.float32)


@triton.jit
def _paged_decode_quant_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, tables_ptr, lens_ptr, out_ptr,
    qk_scale,  # softmax scale × log2(e): the kernel works in base 2
    s_qb, s_qh, s_qd,
    s_kn, s_kt, s_kh, s_kd,  # code strides (bytes == elements)
    s_vn, s_vt, s_vh, s_vd,
    s_ksn, s_kst, s_ksh,  # scale strides (float32 elements), scale at column SCALE_COL
    s_vsn, s_vst, s_vsh,
    s_tb, s_tn,
    s_ob, s_oh, s_od,
    SCALE_COL: tl.constexpr,
    FP8: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_SIZE_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):  # fmt: skip
    """Attention of one query token over its paged, quantized context, for one KV head
    group. Grid ``(batch, num_kv_heads)``; see ``triton_ops._paged_decode_kernel``."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)
    t = tl.arange(0, BLOCK_SIZE_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g

    q_offs = seq.to(tl.int64) * s_qb + heads[:, None] * s_qh + d[None, :] * s_qd
    q_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0).to(tl.float32) * qk_scale

    context_len = tl.load(lens_ptr + seq)
    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l = tl.zeros([GROUP_PAD], dtype=tl.float32)  # noqa: E741 - the usual softmax name
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)

    table_row = tables_ptr + seq.to(tl.int64) * s_tb
    for j in range(0, tl.cdiv(context_len, BLOCK_SIZE)):
        block_id = tl.load(table_row + j * s_tn).to(tl.int64)
        t_mask = (t < BLOCK_SIZE) & (j * BLOCK_SIZE + t < context_len)
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k_offs = block_id * s_kn + t[:, None] * s_kt + kv_head * s_kh + d[None, :] * s_kd
        ks_offs = block_id * s_ksn + t * s_kst + kv_head * s_ksh + SCALE_COL
        k_scale = tl.load(ks_ptr + ks_offs, mask=t_mask, other=0.0)
        k = _dequant(tl.load(k_ptr + k_offs, mask=kv_mask, other=0), FP8) * k_scale[:, None]
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        s = tl.where(t_mask[None, :], s, float("-inf"))

        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every visited block has a token
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)  # noqa: E741
        v_offs = block_id * s_vn + t[:, None] * s_vt + kv_head * s_vh + d[None, :] * s_vd
        vs_offs = block_id * s_vsn + t * s_vst + kv_head * s_vsh + SCALE_COL
        v_scale = tl.load(vs_ptr + vs_offs, mask=t_mask, other=0.0)
        v = _dequant(tl.load(v_ptr + v_offs, mask=kv_mask, other=0), FP8) * v_scale[:, None]
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new

    out = acc / tl.where(l > 0.0, l, 1.0)[:, None]
    o_offs = seq.to(tl.int64) * s_ob + heads[:, None] * s_oh + d[None, :] * s_od
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _scale_view(cache: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The cache's memory as float32 (the row's scale is one of its columns) and the
    block / token / head strides of that view, in float32 elements."""
    if cache.stride(3) != 1:
        raise ValueError(f"quantized K/V rows must be contiguous, strides {cache.stride()}")
    flat = cache.view(torch.float32)  # last dim (head_dim + 4) bytes → (head_dim + 4) / 4
    return flat, (flat.stride(0), flat.stride(1), flat.stride(2))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """:func:`engine.triton_ops.paged_decode_attention` over quantized caches: K/V are one
    layer's stored rows ``(num_blocks, block_size, num_kv_heads, head_dim + 4)`` of int8 or
    uint8 (fp8) dtype. Returns ``(batch, num_heads, head_dim)`` in ``q.dtype``."""
    kind = kv_quant.kind_of(k_cache)
    if kind is None or kv_quant.kind_of(v_cache) != kind:
        raise ValueError(f"expected quantized K/V caches, got {k_cache.dtype}, {v_cache.dtype}")
    head_dim = kv_quant.head_dim_of(k_cache)
    _check_attention_args(
        q, k_cache[..., :head_dim], v_cache[..., :head_dim], block_tables, context_lens
    )
    batch, num_heads, _ = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    k_scales, ks_strides = _scale_view(k_cache)
    v_scales, vs_strides = _scale_view(v_cache)
    tables = block_tables.to(device=q.device, dtype=torch.int32)
    lens = context_lens.to(device=q.device, dtype=torch.int32).contiguous()
    _paged_decode_quant_kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, k_scales, v_scales, tables, lens, out,
        scale * math.log2(math.e),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *ks_strides, *vs_strides,
        *tables.stride(), *out.stride(),
        SCALE_COL=head_dim // kv_quant.SCALE_BYTES,
        FP8=kind == kv_quant.FP8,
        GROUP=group,
        GROUP_PAD=triton.next_power_of_2(group),
        BLOCK_SIZE=block_size,
        BLOCK_SIZE_PAD=triton.next_power_of_2(block_size),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
    )  # fmt: skip
    return out


def reference_paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Pure torch, same contract: dequantize the whole cache, then the naive reference."""
    from engine.triton_ops import reference_paged_decode_attention as plain

    k = kv_quant.dequantize(k_cache, torch.float32)
    v = kv_quant.dequantize(v_cache, torch.float32)
    return plain(q.float(), k, v, block_tables, context_lens, scale).to(q.dtype)
