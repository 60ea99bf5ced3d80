"""Chained block hashes: the one function the engine, the workers and the router share.

A prompt is cut into full blocks of ``block_size`` tokens. Block ``i``'s hash covers its
parent's hash and its own token ids, so equal hashes mean equal prefixes up to and including
that block. The hash is a stable 64-bit integer (blake2b), identical across processes and
Python versions, so it can travel in KV events and live in Redis.

Torch-free on purpose: the router imports it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

# Parent of the first block. Any fixed value works; zero keeps events readable.
ROOT_HASH = 0


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Hash of one block given its parent's hash and its token ids."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(struct.pack("<Q", parent_hash))
    digest.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return int.from_bytes(digest.digest(), "little")


def block_hashes(
    token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_HASH
) -> list[int]:
    """Hashes of every *full* block of ``token_ids``; a trailing partial block has none."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block(parent_hash, token_ids[start : start + block_size])
        hashes.append(parent_hash)
    return hashes
