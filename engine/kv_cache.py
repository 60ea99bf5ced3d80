"""The paged KV cache: one tensor, fixed-size blocks, addressed by block id.

Layout: ``(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)`` — index 0 of
the second axis is K, 1 is V. A token at position ``p`` of a sequence lives in block
``block_table[p // block_size]`` at offset ``p % block_size``; its *slot* is
``block_id * block_size + offset``. Keeping all layers in one tensor lets the KV transfer
gather a request's blocks for one layer (layer-wise mode) or for all layers in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine import block_copy

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Geometry of a KV cache; two caches can exchange blocks only if these match."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    dtype: str = "float32"

    @property
    def block_shape(self) -> tuple[int, int, int]:
        return (self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        itemsize = torch.tensor([], dtype=torch_dtype(self.dtype)).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

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
        self.tensor = torch.zeros(
            (layout.num_layers, 2, layout.num_blocks, *layout.block_shape),
            dtype=torch_dtype(layout.dtype),
            device=self.device,
        )

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
