"""Triton kernels for the paged KV cache: block gather / scatter and paged decode attention.

Used on CUDA only: :mod:`engine.block_copy` imports this module lazily when the cache lives
on a GPU, so CPU-only installs never need triton. Importing it without triton raises an
``ImportError`` that says so. Tests run the same kernels on CPU tensors with
``TRITON_INTERPRET=1``, which triton reads when ``@triton.jit`` decorates a function — i.e.
when this module is first imported — so the variable must be set before that.

Cache geometry (see :mod:`engine.kv_cache`): one layer's K or V is
``(num_blocks, block_size, num_kv_heads, head_dim)``, strided over blocks in a page-first
cache; a sequence's token ``p`` lives in block ``block_table[p // block_size]`` at offset
``p % block_size``.

All kernels take strides explicitly (views and slices of the cache are fine) and compute
offsets in int64 wherever ``block_id * stride`` can exceed 2**31 elements. Block ids are
trusted: they come from the block manager and are not range-checked on the device.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "engine.triton_ops needs triton (installed with the 'dev' extra, or any CUDA "
        "torch install); on CPU use engine.block_copy, which falls back to torch"
    ) from exc

BLOCK_AXIS_FROM_END = 4  # (num_blocks, block_size, heads, head_dim)
_COPY_CHUNK = 1024  # elements per inner iteration of the copy kernel
_BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# --------------------------------------------------------------------------- block copy


@triton.jit
def _copy_blocks_kernel(
    src_ptr,
    dst_ptr,
    ids_ptr,
    s_l0, s_l1, s_n, s_t, s_h, s_d,  # source strides (lead0, lead1, block, tok, head, dim)
    d_l0, d_l1, d_n, d_t, d_h, d_d,  # destination strides, same order
    LEAD1: tl.constexpr,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_NUMEL: tl.constexpr,
    CHUNK: tl.constexpr,
    GATHER: tl.constexpr,
):  # fmt: skip
    """Copy one whole KV block for one lead index (layer × K/V).

    Grid: ``(n, num_lead)``; program ``(i, lead)`` copies block ``ids[i]`` of the indexed
    side to block ``i`` of the other side. With ``GATHER`` the source is indexed by
    ``ids`` (cache → buffer); otherwise the destination is (buffer → cache).
    """
    i = tl.program_id(0)
    lead = tl.program_id(1)
    block_id = tl.load(ids_ptr + i).to(tl.int64)
    slot = i.to(tl.int64)
    l0 = (lead // LEAD1).to(tl.int64)
    l1 = (lead % LEAD1).to(tl.int64)
    if GATHER:
        src_base = l0 * s_l0 + l1 * s_l1 + block_id * s_n
        dst_base = l0 * d_l0 + l1 * d_l1 + slot * d_n
    else:
        src_base = l0 * s_l0 + l1 * s_l1 + slot * s_n
        dst_base = l0 * d_l0 + l1 * d_l1 + block_id * d_n
    offs = tl.arange(0, CHUNK)
    for start in range(0, BLOCK_NUMEL, CHUNK):
        e = start + offs
        mask = e < BLOCK_NUMEL
        t = e // (HEADS * HEAD_DIM)
        h = (e // HEAD_DIM) % HEADS
        d = e % HEAD_DIM
        vals = tl.load(src_ptr + src_base + t * s_t + h * s_h + d * s_d, mask=mask)
        tl.store(dst_ptr + dst_base + t * d_t + h * d_h + d * d_d, vals, mask=mask)


def _lead_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(lead0 stride, lead1 stride, lead1 size) for a ``(2,)`` or ``(L, 2)`` lead."""
    if t.dim() == 5:
        return 0, t.stride(0), t.size(0)
    return t.stride(0), t.stride(1), t.size(1)


def _launch_copy(src: torch.Tensor, dst: torch.Tensor, ids: torch.Tensor, *, gather: bool) -> None:
    # Copy raw bits: one compiled kernel per element size, bit-exact for every dtype.
    bits = _BITS_DTYPE[src.element_size()]
    src, dst = src.view(bits), dst.view(bits)
    cache = src if gather else dst
    s_l0, s_l1, lead1 = _lead_strides(src)
    d_l0, d_l1, _ = _lead_strides(dst)
    num_lead = math.prod(cache.shape[: cache.dim() - BLOCK_AXIS_FROM_END])
    _, block_size, heads, head_dim = cache.shape[-BLOCK_AXIS_FROM_END:]
    block_numel = block_size * heads * head_dim
    chunk = min(_COPY_CHUNK, triton.next_power_of_2(block_numel))
    _copy_blocks_kernel[(ids.numel(), num_lead)](
        src, dst, ids,
        s_l0, s_l1, *src.stride()[-4:],
        d_l0, d_l1, *dst.stride()[-4:],
        LEAD1=lead1, HEADS=heads, HEAD_DIM=head_dim, BLOCK_NUMEL=block_numel,
        CHUNK=chunk, GATHER=gather,
    )  # fmt: skip


def _check_cache(cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    if cache.dim() not in (5, 6) or cache.size(cache.dim() - 5) != 2:
        raise ValueError(
            f"cache must be (2, blocks, ...) or (layers, 2, blocks, ...), got {tuple(cache.shape)}"
        )
    if block_ids.dim() != 1:
        raise ValueError(f"block_ids must be 1-D, got shape {tuple(block_ids.shape)}")


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """``cache.index_select(cache.dim() - 4, block_ids)`` as a new contiguous tensor.

    ``cache`` is ``(*lead, num_blocks, block_size, heads, head_dim)`` with lead ``(2,)`` or
    ``(num_layers, 2)``; the result is ``(*lead, n, block_size, heads, head_dim)``.
    """
    _check_cache(cache, block_ids)
    ids = block_ids.to(device=cache.device, dtype=torch.int64).contiguous()
    axis = cache.dim() - BLOCK_AXIS_FROM_END
    out_shape = (*cache.shape[:axis], ids.numel(), *cache.shape[axis + 1 :])
    out = torch.empty(out_shape, dtype=cache.dtype, device=cache.device)
    if out.numel():
        _launch_copy(cache, out, ids, gather=True)
    return out


def scatter_blocks(cache: torch.Tensor, block_ids: torch.Tensor, buffer: torch.Tensor) -> None:
    """``cache[..., block_ids, :, :, :] = buffer`` in place (inverse of :func:`gather_blocks`).

    ``buffer`` must have the shape :func:`gather_blocks` would return for these ids; it is
    cast to the cache's dtype. Repeated ids write the same block twice in unspecified order.
    """
    _check_cache(cache, block_ids)
    ids = block_ids.to(device=cache.device, dtype=torch.int64).contiguous()
    axis = cache.dim() - BLOCK_AXIS_FROM_END
    expected = (*cache.shape[:axis], ids.numel(), *cache.shape[axis + 1 :])
    if tuple(buffer.shape) != expected:
        raise ValueError(f"buffer shape {tuple(buffer.shape)} != expected {expected}")
    buffer = buffer.to(device=cache.device, dtype=cache.dtype)
    if buffer.numel():
        _launch_copy(buffer, cache, ids, gather=False)


# --------------------------------------------------------------- paged decode attention


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr,
    qk_scale,  # softmax scale × log2(e): the kernel works in base 2
    s_qb, s_qh, s_qd,
    s_kn, s_kt, s_kh, s_kd,
    s_vn, s_vt, s_vh, s_vd,
    s_tb, s_tn,
    s_ob, s_oh, s_od,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_SIZE_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):  # fmt: skip
    """Attention of one query token over its paged context, for one KV head group.

    Grid: ``(batch, num_kv_heads)``. Program ``(b, kvh)`` handles the ``GROUP`` query heads
    ``kvh * GROUP + g`` that share KV head ``kvh``, so every K/V block is read once per
    group. It walks the sequence's block table one block at a time with an online softmax
    (running max ``m``, normaliser ``l``, fp32 accumulator); the last block is masked to
    ``context_len``. ``*_PAD`` are powers of two ≥ the real sizes (``tl.arange`` needs
    them); padded lanes are masked on load and store.
    """
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
        k = tl.load(k_ptr + k_offs, mask=kv_mask, other=0.0).to(tl.float32)
        # (GROUP_PAD, 1, D) * (1, T, D) summed over D: scores in base-2 log units.
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        s = tl.where(t_mask[None, :], s, float("-inf"))

        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every visited block has a token
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)  # noqa: E741
        v_offs = block_id * s_vn + t[:, None] * s_vt + kv_head * s_vh + d[None, :] * s_vd
        v = tl.load(v_ptr + v_offs, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new

    # context_len == 0 never enters the loop: l == 0 and the output is zeros, not NaN.
    out = acc / tl.where(l > 0.0, l, 1.0)[:, None]
    o_offs = seq.to(tl.int64) * s_ob + heads[:, None] * s_oh + d[None, :] * s_od
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _check_attention_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q (batch, heads, dim) and K/V (blocks, block_size, kv_heads, dim), got "
            f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.size(2)
    if k_cache.size(3) != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q heads/dim {num_heads}/{head_dim} incompatible with K/V")
    if block_tables.dim() != 2 or block_tables.size(0) != batch:
        raise ValueError(f"block_tables must be (batch, max_blocks), got {block_tables.shape}")
    if tuple(context_lens.shape) != (batch,):
        raise ValueError(f"context_lens must be (batch,), got {tuple(context_lens.shape)}")


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention: one query token per sequence against its paged K/V.

    Args:
        q: ``(batch, num_heads, head_dim)``, the new token's queries (already rotated).
        k_cache, v_cache: one layer's ``(num_blocks, block_size, num_kv_heads, head_dim)``;
            must already hold the new token's K/V at position ``context_len - 1``.
        block_tables: int ``(batch, max_blocks_per_seq)``, padded; only the first
            ``ceil(context_len / block_size)`` entries of a row are read.
        context_lens: int ``(batch,)``, valid tokens per sequence (``>= 1``; a 0 row
            yields zeros).
        scale: softmax scale, usually ``head_dim ** -0.5``.

    Returns a contiguous ``(batch, num_heads, head_dim)`` in ``q.dtype``. Grouped-query
    attention: query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``.
    Accumulates in fp32.
    """
    _check_attention_args(q, k_cache, v_cache, block_tables, context_lens)
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous even if q is not
    if batch == 0:
        return out
    tables = block_tables.to(device=q.device, dtype=torch.int32)
    lens = context_lens.to(device=q.device, dtype=torch.int32).contiguous()
    _paged_decode_kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, tables, lens, out,
        scale * math.log2(math.e),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *tables.stride(), *out.stride(),
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
    """Pure-torch :func:`paged_decode_attention` (same contract), for tests and benchmarks.

    Deliberately naive: one sequence at a time, gather its tokens' K/V by slot, explicit
    fp32 softmax. Runs on any device.
    """
    _check_attention_args(q, k_cache, v_cache, block_tables, context_lens)
    batch, num_heads, _ = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    for b in range(batch):
        n = int(context_lens[b])
        if n == 0:
            continue
        pos = torch.arange(n, device=k_cache.device)
        blocks = block_tables[b].to(k_cache.device).long()[pos // block_size]
        k = k_cache[blocks, pos % block_size].float()  # (n, kv_heads, head_dim)
        v = v_cache[blocks, pos % block_size].float()
        k = k.repeat_interleave(group, dim=1)  # (n, heads, head_dim)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", probs, v).to(q.dtype)
    return out
