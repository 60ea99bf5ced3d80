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

**The KV dtype** (``KVCompat.dtype``) is the cache's element format, which is what the
bytes mean: the model's dtype ("float32", "bfloat16", "float16") for an unquantized cache
(``kv_cache_dtype: auto``), or a quantized format — "fp8_e4m3" or "int8"
(``kv_cache_dtype: fp8 | int8``, engine/kv_quant.py), whose every row (one token's K or V
for one KV head) is ``head_dim`` one-byte codes followed by its float32 scale
(:func:`row_bytes`). A fp8 prefill worker and a bf16 (``auto``) decode worker therefore
differ in ``dtype``: the handshake refuses the pair (``dtype: receiver 'bfloat16', sender
'fp8_e4m3'``) and the decode worker prefills locally (or fails the request, per its
``on_prefill_failure``). Registrations and handshakes of workers older than KV
quantization carry the model's dtype here, which is exactly their (unquantized) KV dtype,
so they parse and compare unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields

LAYER_FIRST = "layer_first"  # the engine's default cache order, and that of old peers
FP8_E4M3 = "fp8_e4m3"  # quantized KV formats (engine/kv_quant.py): one byte per value
INT8 = "int8"
QUANTIZED_KV_DTYPES = (FP8_E4M3, INT8)
SCALE_BYTES = 4  # the float32 scale at the end of every quantized row
# Bytes per stored element of each KV dtype name ("float8_e4m3fn": a name once reserved
# for fp8, kept so such a registration still parses).
_ELEMENT_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    FP8_E4M3: 1,
    INT8: 1,
    "float8_e4m3fn": 1,
}
KV_DTYPES = tuple(_ELEMENT_BYTES)


def row_bytes(dtype: str, head_dim: int) -> int:
    """Bytes of one stored row — one token's K (or V) for one KV head — of a cache of
    ``dtype``: ``head_dim`` elements, plus the scale for a quantized format. Raises
    ValueError for an unknown dtype name."""
    if dtype not in _ELEMENT_BYTES:
        raise ValueError(f"unknown KV dtype {dtype!r}; known: {sorted(_ELEMENT_BYTES)}")
    scale = SCALE_BYTES if dtype in QUANTIZED_KV_DTYPES else 0
    return head_dim * _ELEMENT_BYTES[dtype] + scale


@dataclass(frozen=True, slots=True)
class KVCompat:
    """The part of a KV cache's description that two peers must share."""

    model: str  # model identity (name or checkpoint path)
    # KV cache dtype name: the model's ("float32", "bfloat16", ...) or a quantized format
    # ("fp8_e4m3", "int8"); see the module docstring.
    dtype: str
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
