"""Gather KV blocks into a contiguous buffer and scatter them back, by block id.

The block axis is the third-from-last-but-two: ``cache[..., num_blocks, block_size, heads,
head_dim]`` (``...`` is ``(2,)`` for one layer or ``(num_layers, 2)`` for all). On CUDA the
Triton kernels in :mod:`engine.triton_ops` do the copy; elsewhere torch's indexing does.
"""

from __future__ import annotations

import torch

BLOCK_AXIS_FROM_END = 4  # (num_blocks, block_size, heads, head_dim)


def _use_triton(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """``cache[..., block_ids, :, :, :]`` as a new contiguous tensor."""
    if _use_triton(cache):
        from engine import triton_ops

        return triton_ops.gather_blocks(cache, block_ids)
    axis = cache.dim() - BLOCK_AXIS_FROM_END
    return cache.index_select(axis, block_ids.long())


def scatter_blocks(cache: torch.Tensor, block_ids: torch.Tensor, buffer: torch.Tensor) -> None:
    """``cache[..., block_ids, :, :, :] = buffer`` in place."""
    if _use_triton(cache):
        from engine import triton_ops

        triton_ops.scatter_blocks(cache, block_ids, buffer)
        return
    axis = cache.dim() - BLOCK_AXIS_FROM_END
    cache.index_copy_(axis, block_ids.long(), buffer.to(cache.dtype))
