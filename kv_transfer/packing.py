"""Gather source blocks into a frame's payload, scatter a payload into destination blocks,
and the cache views that direct pieces are sent from and received into.

A staged payload covers layers [l0, l1) and some of the transfer's positions; it is the
contiguous tensor ``(l1 - l0, 2, n, block_size, kv_heads, head_dim)``, i.e. exactly
``KVCache.gather`` of those blocks over those layers (:func:`pack` / :func:`unpack` for a
whole chunk rectangle, :func:`pack_staged` / :func:`unpack_staged` for a frame's staged
positions). Source and destination block ids differ; position ``i`` of the transfer goes
from ``src_ids[i]`` to ``dst_ids[i]``. A direct piece (:func:`piece_view`) is K or V of
one layer over a segment (layer-first caches) or every layer's K and V of it (whole pages,
page-first caches): a slice of the cache's storage, contiguous on both sides.

Frames live in :class:`Staging` buffers that each pair allocates once and reuses: a fresh
allocation per chunk costs page faults that, measured here, cut the gather to a quarter of
its speed. On CPU the copies are torch indexing with ``out=``; on CUDA they go through
``engine.block_copy`` (the Triton kernels).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine import block_copy
from engine.kv_cache import KVCache, KVLayout, torch_dtype
from kv_transfer.segments import PAGES, Frame, Piece
from kv_transfer.wire import CTRL_BYTES, HEADER_BYTES, Chunk

BLOCK_AXIS = 2  # of a layer slice (layers, 2, num_blocks, block_size, heads, head_dim)


def run_in_inference_mode(body: Callable[[], None]) -> None:
    """Run a pair thread's ``body`` under ``torch.inference_mode()``. An engine's cache,
    and staging buffers first touched on an engine thread, may be inference tensors, which
    can be written (headers, recv, scatter) only in inference mode; normal tensors work
    there too. The mode is thread-local, so each pair thread enters it itself."""
    with torch.inference_mode():
        body()


def layer_block_bytes(layout: KVLayout) -> int:
    """Bytes of K and V of one block in one layer."""
    return layout.bytes_per_block // layout.num_layers


def block_index(block_ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(block_ids, dtype=torch.int64, device=device)


class Staging:
    """A pair's reusable buffers, each grown on demand and never shrunk: ``slots`` frame
    buffers, a control frame per direction, and a scratch buffer for direct pieces that
    are not real KV (:func:`piece_scratch`). Buffers start zeroed, so a filler never puts
    stale memory on the wire."""

    def __init__(self, device: torch.device, slots: int = 2) -> None:
        self.device = device
        self.slots = slots
        self._buffers: dict[int | str, torch.Tensor] = {}
        # Control frames; one per direction because a send and a recv can be in flight
        # together (BEGIN out while ACCEPT is already posted).
        self.tx_control = torch.zeros(CTRL_BYTES, dtype=torch.uint8, device=device)
        self.rx_control = torch.zeros(CTRL_BYTES, dtype=torch.uint8, device=device)

    def frame(self, slot: int, payload_bytes: int) -> torch.Tensor:
        """A frame of exactly ``HEADER_BYTES + payload_bytes`` bytes in buffer ``slot``."""
        return self._buffer(slot, HEADER_BYTES + payload_bytes)

    def scratch(self, nbytes: int) -> torch.Tensor:
        return self._buffer("scratch", nbytes)

    def _buffer(self, key: int | str, size: int) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < size:
            buf = torch.zeros(size, dtype=torch.uint8, device=self.device)
            self._buffers[key] = buf
        return buf[:size]


def piece_bytes(layout: KVLayout, piece: Piece) -> int:
    layer, _, start, stop = piece
    per_block = layout.bytes_per_block if layer == PAGES else layer_block_bytes(layout) // 2
    return per_block * (stop - start)


def piece_scratch(staging: Staging, layout: KVLayout, piece: Piece) -> torch.Tensor:
    """A buffer of ``piece``'s size and dtype in the pair's scratch: what a receiver drains
    the pieces of a transfer that already ended into, and what a sender's filler pieces
    (after an ABORT) are sent from. Its content is never KV."""
    return staging.scratch(piece_bytes(layout, piece)).view(torch_dtype(layout.dtype))


def payload_view(frame: torch.Tensor, chunk: Chunk, layout: KVLayout) -> torch.Tensor:
    shape = (
        chunk.layer_stop - chunk.layer_start,
        2,
        chunk.block_stop - chunk.block_start,
        *layout.block_shape,
    )
    nbytes = chunk.nbytes(layer_block_bytes(layout))
    body = frame[HEADER_BYTES : HEADER_BYTES + nbytes]
    return body.view(torch_dtype(layout.dtype)).view(shape)


def pack(cache: KVCache, src_ids: torch.Tensor, chunk: Chunk, frame: torch.Tensor) -> int:
    """Gather the chunk's source blocks into ``frame``'s payload; returns payload bytes."""
    source = cache.tensor[chunk.layer_start : chunk.layer_stop]
    ids = src_ids[chunk.block_start : chunk.block_stop]
    out = payload_view(frame, chunk, cache.layout)
    if source.is_cuda:
        out.copy_(block_copy.gather_blocks(source, ids))
    else:
        torch.index_select(source, BLOCK_AXIS, ids, out=out)
    return out.numel() * out.element_size()


def unpack(cache: KVCache, dst_ids: torch.Tensor, chunk: Chunk, frame: torch.Tensor) -> int:
    """Scatter ``frame``'s payload into the chunk's destination blocks; returns bytes."""
    target = cache.tensor[chunk.layer_start : chunk.layer_stop]
    ids = dst_ids[chunk.block_start : chunk.block_stop]
    payload = payload_view(frame, chunk, cache.layout)
    block_copy.scatter_blocks(target, ids, payload)
    return payload.numel() * payload.element_size()


def staged_view(buffer: torch.Tensor, frame: Frame, layout: KVLayout) -> torch.Tensor:
    """The staged payload of ``frame`` inside its first message ``buffer``."""
    shape = (frame.num_layers, 2, len(frame.staged), *layout.block_shape)
    nbytes = frame.staged_bytes(layer_block_bytes(layout))
    body = buffer[HEADER_BYTES : HEADER_BYTES + nbytes]
    return body.view(torch_dtype(layout.dtype)).view(shape)


def staged_ids(block_ids: tuple[int, ...], frame: Frame, device: torch.device) -> torch.Tensor:
    """This side's block ids of the frame's staged positions."""
    return block_index(tuple(block_ids[p] for p in frame.staged), device)


def pack_staged(cache: KVCache, ids: torch.Tensor, frame: Frame, buffer: torch.Tensor) -> None:
    """Gather the blocks ``ids`` (:func:`staged_ids`) of the frame's layers into ``buffer``."""
    source = cache.tensor[frame.chunk.layer_start : frame.chunk.layer_stop]
    out = staged_view(buffer, frame, cache.layout)
    if source.is_cuda:
        out.copy_(block_copy.gather_blocks(source, ids))
    else:
        torch.index_select(source, BLOCK_AXIS, ids, out=out)


def unpack_staged(cache: KVCache, ids: torch.Tensor, frame: Frame, buffer: torch.Tensor) -> None:
    """Scatter the staged payload in ``buffer`` into the blocks ``ids``."""
    target = cache.tensor[frame.chunk.layer_start : frame.chunk.layer_stop]
    block_copy.scatter_blocks(target, ids, staged_view(buffer, frame, cache.layout))


def piece_view(cache: KVCache, block_ids: tuple[int, ...], piece: Piece) -> torch.Tensor:
    """K or V of one layer over a segment, or whole pages of it, as a contiguous view of
    the cache's storage.

    The segment is one run on this side, so its blocks are ``block_ids[start]`` onwards."""
    layer, kv, start, stop = piece
    first = block_ids[start]
    if layer == PAGES:
        return cache.storage[first : first + (stop - start)]
    return cache.storage[layer, kv, first : first + (stop - start)]


def piece_views(cache: KVCache, block_ids: tuple[int, ...], frame: Frame) -> list[torch.Tensor]:
    """Every direct piece of ``frame`` in wire order (:meth:`Frame.pieces`), a few tensor
    calls per segment rather than per piece: they are on the hot path."""
    if frame.pages:  # one piece per segment already
        return [piece_view(cache, block_ids, piece) for piece in frame.pieces()]
    views: list[torch.Tensor] = []
    layers = slice(frame.chunk.layer_start, frame.chunk.layer_stop)
    for start, stop in frame.direct:
        first = block_ids[start]
        views += cache.storage[layers, :, first : first + (stop - start)].flatten(0, 1).unbind(0)
    return views
