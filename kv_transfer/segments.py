"""What each frame of a transfer carries: contiguous segments sent in place, the rest staged.

Position ``p`` of a transfer moves from source block ``src_ids[p]`` to destination block
``dst_ids[p]``. A *run* is a stretch of positions whose ids are consecutive on one side —
the engine's block manager hands out ids as few runs as its free space allows
(``engine.free_blocks``), so most transfers are one or a few runs. Where a source run and
a destination run overlap, the overlap is one run on both sides: a *segment*. What of a
segment is one contiguous slice on both sides depends on the caches' memory order
(``engine.kv_cache``): in a layer-first cache, K (or V) of one layer; in a page-first
cache, every layer's K and V at once (a *whole-pages* piece, so a whole-mode segment is
one message, not ``2 × layers``). Such a slice goes on the wire as it is — sent from the
sender's cache view, received into the receiver's cache view — with no gather, no staging
buffer and no scatter: a *direct piece*. A page-first cache has none in layer-wise mode
(one layer of a run of its blocks is strided), so there every block is staged.

A message costs a fixed amount (Python, gloo's rendezvous, thread wake-ups) on top of its
bytes, so pieces under ``direct_min_bytes`` are not worth their own message: their blocks
are *staged* instead — gathered, for all the frame's layers and K and V, into the payload
that follows the frame's header, and scattered at the receiver, as every block was before.
A fully scattered transfer is therefore exactly the old staged protocol; a contiguous one
moves no byte through staging.

Each side therefore only needs the other's *long* runs (:func:`long_runs`: at least
:func:`run_min_blocks` blocks): they travel inline in BEGIN and ACCEPT, at most
``limit`` of them (the longest; leaving a run out only stages its blocks). The frames are
the chunk rectangles of :func:`kv_transfer.wire.plan_chunks` (layers × positions, at most
``chunk_bytes`` each; for whole pages, every layer × a range of positions); a frame is sent
as its first message (header + staged payload) followed by its direct pieces, by segment,
then layer, K before V. Both sides compute the same plan, so every message size is known
before it is posted, and the receiver posts a frame's pieces together with its first
message (:func:`post_limit`).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from kv_transfer.types import TransferMode
from kv_transfer.wire import Chunk, plan_chunks

Segment = tuple[int, int]  # positions [start, stop) of the transfer
DIRECT_FRAME_FACTOR = 2  # a mostly direct frame may be this many times chunk_bytes
Piece = tuple[int, int, int, int]  # (layer, 0 = K | 1 = V, start, stop)
PAGES = -1  # layer and kv of a whole-pages piece: every layer, K and V


def whole_pages(page_first: bool, mode: TransferMode) -> bool:
    """Whether a transfer's direct pieces are whole pages: page-first caches, whole mode."""
    return page_first and mode is TransferMode.WHOLE


def direct_blocks(direct_min_bytes: int, layer_block_bytes: int, pages_of: int = 0) -> int:
    """The fewest blocks that make a direct piece: K (or V) of one layer, or whole pages of
    ``pages_of`` layers."""
    piece_block_bytes = layer_block_bytes * pages_of if pages_of else layer_block_bytes // 2
    return max(1, -(-direct_min_bytes // piece_block_bytes))


def run_min_blocks(
    direct_min_bytes: int,
    layer_block_bytes: int,
    num_layers: int,
    mode: TransferMode,
    page_first: bool,
) -> int:
    """The fewest blocks of a segment that go direct in this transfer: the shortest run
    worth listing (:func:`long_runs`)."""
    pages_of = num_layers if whole_pages(page_first, mode) else 0
    return direct_blocks(direct_min_bytes, layer_block_bytes, pages_of)


def long_runs(block_ids: Sequence[int], min_blocks: int, limit: int) -> tuple[Segment, ...]:
    """Position ranges ``[start, stop)`` of the runs of at least ``min_blocks`` consecutive
    ids — the ``limit`` longest, in position order."""
    runs: list[Segment] = []
    start = 0
    for p in range(1, len(block_ids) + 1):
        if p == len(block_ids) or block_ids[p] != block_ids[p - 1] + 1:
            if p - start >= min_blocks:
                runs.append((start, p))
            start = p
    if len(runs) > limit:
        runs = sorted(sorted(runs, key=lambda r: r[0] - r[1])[:limit])
    return tuple(runs)


def overlaps(a: Sequence[Segment], b: Sequence[Segment]) -> tuple[Segment, ...]:
    """The non-empty intersections of two sorted lists of disjoint ranges, in order."""
    out: list[Segment] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame: its chunk rectangle, the positions it stages, the segments it sends in place."""

    chunk: Chunk
    staged: tuple[int, ...]  # positions gathered into the payload (every layer of the chunk)
    direct: tuple[Segment, ...]  # segments sent as pieces straight from / into the caches
    pages: bool = False  # each direct segment is one whole-pages piece (page-first caches)

    @property
    def index(self) -> int:
        return self.chunk.index

    @property
    def num_layers(self) -> int:
        return self.chunk.layer_stop - self.chunk.layer_start

    def staged_bytes(self, layer_block_bytes: int) -> int:
        """Payload of the first message (after the header)."""
        return self.num_layers * len(self.staged) * layer_block_bytes

    def pieces(self) -> list[Piece]:
        """The direct pieces in wire order: by segment, then layer, K before V."""
        if self.pages:
            return [(PAGES, PAGES, start, stop) for start, stop in self.direct]
        return [
            (layer, kv, start, stop)
            for start, stop in self.direct
            for layer in range(self.chunk.layer_start, self.chunk.layer_stop)
            for kv in (0, 1)
        ]

    def nbytes(self, layer_block_bytes: int) -> int:
        return self.chunk.nbytes(layer_block_bytes)


def plan_frames(
    num_blocks: int,
    num_layers: int,
    layer_block_bytes: int,
    mode: TransferMode,
    chunk_bytes: int,
    direct_min_bytes: int,
    src_runs: Sequence[Segment],
    dst_runs: Sequence[Segment],
    *,
    page_first: bool = False,
) -> tuple[Frame, ...]:
    """The frames of a transfer, from both sides' runs (:func:`long_runs`) and the caches'
    memory order (the handshake made sure both sides have the same)."""
    pages = whole_pages(page_first, mode)
    segments: list[Segment] = []  # layer-wise into page-first caches: nothing goes in place
    if pages or not page_first:
        min_blocks = run_min_blocks(
            direct_min_bytes, layer_block_bytes, num_layers, mode, page_first
        )
        segments = [s for s in overlaps(src_runs, dst_runs) if s[1] - s[0] >= min_blocks]
    num_staged = num_blocks - sum(b - a for a, b in segments)
    frame_bytes = _frame_bytes(num_blocks, num_staged, layer_block_bytes, chunk_bytes, pages)
    # The ramp shortens the pack at the start and the landing at the end of a pipeline;
    # a transfer that stages nothing has neither, and every extra frame costs a header.
    chunks = plan_chunks(
        num_blocks,
        num_layers,
        layer_block_bytes,
        mode,
        frame_bytes,
        ramp=num_staged > 0,
        across_layers=pages,
    )
    starts = [a for a, _ in segments]
    split: dict[tuple[int, int], tuple[tuple[int, ...], tuple[Segment, ...]]] = {}
    frames = []
    for chunk in chunks:
        span = (chunk.block_start, chunk.block_stop)
        if span not in split:  # whole-layer chunks all share one span
            staged: list[int] = []
            pieces: list[Segment] = []
            at = span[0]  # positions before ``at`` are placed
            for a, b in segments[max(bisect.bisect_right(starts, span[0]) - 1, 0) :]:
                lo, hi = max(a, span[0]), min(b, span[1])
                if lo >= span[1]:
                    break
                if hi - lo < min_blocks:  # cut short by the chunk: not worth a message
                    continue
                staged.extend(range(at, lo))
                pieces.append((lo, hi))
                at = hi
            staged.extend(range(at, span[1]))
            split[span] = (tuple(staged), tuple(pieces))
        frames.append(Frame(chunk, *split[span], pages=pages))
    return tuple(frames)


def _frame_bytes(
    num_blocks: int, num_staged: int, layer_block_bytes: int, chunk_bytes: int, pages: bool
) -> int:
    """How big a frame may be.

    ``chunk_bytes`` bounds a frame's staged payload (its staging memory); direct pieces
    need none, and bigger frames let the receiver post more pieces ahead (a piece the
    sender posts first costs gloo a notification round trip), so a frame may carry up to
    DIRECT_FRAME_FACTOR times more when few of its blocks are staged. Measured for a
    contiguous 256 MiB transfer on the 2-core dev VM, factor 1 / 2 / 4: 114 / 83 / 80 ms,
    sender abort() 6 / 15 / 31 ms (it waits for the pieces in flight).

    A frame of whole layers stages its share of the staged positions, so the bound holds
    for frames up to ``num_blocks / num_staged`` times ``chunk_bytes``; frames that split a
    layer keep ``chunk_bytes``. Whole-pages frames cut positions, so the staged ones may
    all fall into one frame: they grow only when nothing is staged.
    """
    if pages:
        return chunk_bytes if num_staged else DIRECT_FRAME_FACTOR * chunk_bytes
    frame_bytes = chunk_bytes
    if num_staged * DIRECT_FRAME_FACTOR < num_blocks:
        frame_bytes = DIRECT_FRAME_FACTOR * chunk_bytes
    elif num_staged < num_blocks:
        frame_bytes = chunk_bytes * num_blocks // num_staged
    if num_blocks * layer_block_bytes > frame_bytes:
        frame_bytes = chunk_bytes
    return frame_bytes


def post_limit(plan: Sequence[Frame], landed: int, depth: int) -> int:
    """How many frames the receiver has posted (first message and direct pieces), at most.

    Messages are matched in the order they were posted (NCCL has no tags, and gloo
    matches per tag in order), so the receiver posts exactly the sender's order: F0 P0
    F1 P1 …, where Fi is frame i's first message and Pi its direct pieces, and it keeps
    ``depth`` frames posted ahead of the landing. Pieces go in with their first message,
    before its header is checked: a piece whose receive is posted when the sender starts
    it goes straight onto the wire, while one posted later costs gloo a notification
    round trip (measured here, 16 MiB as 60 pieces: 7.1 ms posted ahead, 11.4 ms posted
    after the header, 8.1 ms as one message). The sender uses the same rule to know which
    frames an ABORT must fill.
    """
    return min(len(plan), landed + depth)
