"""KV cache events: what a worker's block manager tells the world about its prefix cache.

The engine emits them; workers publish them (Redis streams, :mod:`common.kv_stream`); the
router's prefix index consumes them. Plain dataclasses so they cross process boundaries
without torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockStored:
    """A full block became reusable from the prefix cache."""

    block_hash: int  # chained hash of the block (common.hashing)
    parent_hash: int  # hash of the previous block, ROOT_HASH for the first
    block_id: int  # physical block id on the emitting worker


@dataclass(frozen=True, slots=True)
class BlockEvicted:
    """A cached block was reclaimed; its hash no longer resolves on this worker."""

    block_hash: int
    block_id: int


KVEvent = BlockStored | BlockEvicted


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """Marker in a pool's KV stream: drop every block indexed for this worker (it
    restarted or left). Workers publish it on (de)registration, never the engine."""


StreamEvent = KVEvent | AllBlocksCleared
