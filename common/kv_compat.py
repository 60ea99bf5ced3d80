"""KV compatibility: what two workers' caches must share for blocks to move between them.

Blocks are copied between caches as raw bytes, so both sides must agree on the model (the
KV of another model is garbage), the element type, the block's shape and the cache's
memory order (direct pieces slice the caches in place). Capacity may differ.

:class:`KVCompat` is that one definition, torch-free. Two types extend it:

- ``common.worker_info.BlockGeometry`` adds the capacity: what a worker registers, so the
  registry's view of a worker answers the same question;
- ``kv_transfer.types.Handshake`` adds the transport's backend and protocol version: what
  a KV sender and receiver exchange before any block moves, refusing a peer whose
  ``mismatch`` is not None.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields

LAYER_FIRST = "layer_first"  # the engine's default cache order, and that of old peers


@dataclass(frozen=True, slots=True)
class KVCompat:
    """The part of a KV cache's description that two peers must share."""

    model: str  # model identity (name or checkpoint path)
    dtype: str  # KV cache dtype name, e.g. "float32"
    block_size: int  # tokens per block
    num_layers: int
    num_kv_heads: int
    head_dim: int
    # The cache's memory order (engine.kv_cache), "layer_first" or "page_first". Keyword
    # only, so extensions can add positional fields; absent from old registrations and
    # handshakes, which were all layer-first.
    order: str = field(default=LAYER_FIRST, kw_only=True)

    def mismatch(self, other: KVCompat, mine: str = "we", theirs: str = "peer") -> str | None:
        """None when blocks can move between the two; else every differing field, e.g.
        ``"order: receiver 'layer_first', sender 'page_first'"``, ``"; "``-joined."""
        names = [f.name for f in fields(KVCompat)]
        return "; ".join(differences(self, other, names, mine, theirs)) or None


def differences(a: object, b: object, names: Iterable[str], mine: str, theirs: str) -> list[str]:
    """``"field: <mine> value, <theirs> value"`` for each of ``names`` that differs."""
    return [
        f"{name}: {mine} {getattr(a, name)!r}, {theirs} {getattr(b, name)!r}"
        for name in names
        if getattr(a, name) != getattr(b, name)
    ]
