"""The paged KV cache: one tensor, fixed-size blocks, addressed by block id.

Everything reads the cache through ``KVCache.tensor``, the *logical* view
``(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)`` — index 0 of the second
axis is K, 1 is V. Keeping all layers in one tensor lets the KV transfer gather a request's
blocks for one layer (layer-wise mode) or for all layers in one call.

The memory underneath (``KVCache.storage``) has one of two orders (``KVLayout.order``):

- ``layer_first``: the logical shape itself. One layer's K of a run of blocks is contiguous,
  so a layer-wise transfer sends it in place.
- ``page_first``: ``(num_blocks, num_layers, 2, block_size, heads, head_dim)``. Every layer's
  K and V of a run of blocks is one contiguous stretch, so a whole-request transfer sends a
  run as one message instead of ``2 × num_layers`` (SGLang's HiCache calls this order
  ``page_first``; vLLM's KV connectors call it cross-layer blocks).

A token at position ``p`` of a sequence lives in block ``block_table[p // block_size]`` at
offset ``p % block_size``. Attention addresses one layer's K (or V) by *row*: its *slot* is
``block_id * row_stride + offset``, where ``row_stride`` is the number of rows between two
blocks of one layer — ``block_size`` when layer-first, ``num_layers * 2 * block_size`` when
page-first (:func:`slot_rows` is the matching view).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine import block_copy, kv_quant
from engine.config import KV_CACHE_ORDERS

ORDERS = KV_CACHE_ORDERS
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a cache (or model) of this dtype name is stored in; the quantized KV
    formats ("fp8_e4m3", "int8": engine/kv_quant.py) are stored as bytes."""
    if kv_quant.is_quantized(name):
        return kv_quant.storage_dtype(name)
    return _DTYPES[name]


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Geometry of a KV cache; two caches can exchange blocks only if these match."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    # The model's dtype name, or a quantized KV format ("fp8_e4m3" | "int8", whose rows carry
    # a float32 scale after the head_dim codes: engine/kv_quant.py).
    dtype: str = "float32"
    # "layer_first" (the logical order, the default) or "page_first"
    # (EngineConfig.kv_cache_order). See the module docstring.
    order: str = "layer_first"

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"KV cache order must be one of {ORDERS}, got {self.order!r}")

    @property
    def page_first(self) -> bool:
        return self.order == "page_first"

    @property
    def row_stride(self) -> int:
        """Rows of ``(heads, head_dim)`` between two consecutive blocks of one layer's K."""
        return self.block_size * (2 * self.num_layers if self.page_first else 1)

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """One layer's K (or V) block as stored: quantized rows are ``head_dim + 4`` wide."""
        return (self.block_size, self.num_kv_heads, kv_quant.row_width(self.dtype, self.head_dim))

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        itemsize = torch.tensor([], dtype=torch_dtype(self.dtype)).element_size()
        width = kv_quant.row_width(self.dtype, self.head_dim)
        return 2 * self.num_layers * self.num_kv_heads * width * itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_block * self.num_blocks


class KVCache:
    """Owns the cache tensor. Allocation of block ids is the BlockManager's job."""

    def __init__(self, layout: KVLayout, device: str | torch.device = "cpu") -> None:
        self.layout = layout
        self.device = torch.device(device)
        lead = (layout.num_layers, 2, layout.num_blocks)
        if layout.page_first:
            lead = (layout.num_blocks, layout.num_layers, 2)
        self.storage = torch.zeros(
            (*lead, *layout.block_shape), dtype=torch_dtype(layout.dtype), device=self.device
        )
        # The logical (layers, 2, blocks, ...) view, whatever the order underneath.
        self.tensor = self.storage.permute(1, 2, 0, 3, 4, 5) if layout.page_first else self.storage

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each ``(num_blocks, block_size, num_kv_heads, head_dim)``."""
        return self.tensor[index, 0], self.tensor[index, 1]

    def gather(self, block_ids: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Copy the given blocks into a new contiguous buffer.

        With ``layer`` the result is ``(2, n, block_size, heads, head_dim)``; without it,
        ``(num_layers, 2, n, block_size, heads, head_dim)``.
        """
        source = self.tensor if layer is None else self.tensor[layer]
        return block_copy.gather_blocks(source, block_ids.to(self.device))

    def scatter(
        self, block_ids: torch.Tensor, buffer: torch.Tensor, layer: int | None = None
    ) -> None:
        """Write a buffer produced by :meth:`gather` into the given (other) block ids."""
        target = self.tensor if layer is None else self.tensor[layer]
        block_copy.scatter_blocks(target, block_ids.to(self.device), buffer)


def slot_rows(cache: torch.Tensor) -> torch.Tensor:
    """One layer's K (or V), ``(num_blocks, block_size, heads, head_dim)`` with any block
    stride, as rows ``(R, heads, head_dim)`` such that row ``block * row_stride + offset`` is
    that token's K: a view, so rows written through it land in the cache.

    Contiguous (layer-first) caches are a plain ``view``. A page-first layer is strided over
    blocks; its rows view spans the other layers' rows too, which no slot ever names."""
    num_blocks, block_size, heads, dim = cache.shape
    if cache.is_contiguous():
        return cache.view(-1, heads, dim)
    if cache.stride(1) != heads * dim or cache.stride(2) != dim or cache.stride(3) != 1:
        raise ValueError(f"a block of the cache must be contiguous, strides {cache.stride()}")
    row_stride = cache.stride(0) // cache.stride(1)
    num_rows = (num_blocks - 1) * row_stride + block_size
    return cache.as_strided((num_rows, heads, dim), (heads * dim, dim, 1))
