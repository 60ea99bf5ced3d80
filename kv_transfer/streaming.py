"""One transfer's frames leaving the sender: packed, posted, drained — or aborted.

For each frame i of the plan (:mod:`kv_transfer.segments`) the sender posts its first
message Fi (header + staged payload, packed into staging slot ``i % depth``) and then its
direct pieces Pi, straight from the cache. Up to ``depth`` frames are in flight: a slot is
reused only once its frame's operations are through (``_drain``), which is also when the
frame's lease on the source blocks ends — so ``release`` never runs while the wire may
still read them. Frames with pieces keep at most one other frame in flight: that bounds
how long ``abort()`` waits for the leases (frames are up to twice ``chunk_bytes`` when
they are mostly pieces). Layer-wise frames wait for their layer to be marked ready.

When the transfer ends here first (abort, deadline, the receiver's abort flag) the next
frame goes out as ABORT(i) instead, followed by fillers for everything else the receiver
has posted by then (:func:`~kv_transfer.segments.post_limit`, the rule the receiver
follows): filler ABORTs for the later first messages and scratch of the planned sizes for
the direct pieces of all those frames, so both sides stay in step and the pair survives.
"""

from __future__ import annotations

import time

from kv_transfer.packing import pack_staged, piece_scratch, piece_views, staged_ids
from kv_transfer.segments import Frame, post_limit
from kv_transfer.torch_dist import FrameOps, PairContext
from kv_transfer.transfer import SendTransfer
from kv_transfer.types import TransferMode
from kv_transfer.wire import TAG_DATA, Header, Kind, error_reason, transfer_key


class Streaming:
    """The sending loop of one transfer on one pair (the pair's thread only).

    ``seq`` is the transfer's number on the pair (from its BEGIN), ``peer_depth`` the
    frames the receiver keeps posted (from its ACCEPT)."""

    def __init__(
        self,
        pair: PairContext,
        transfer: SendTransfer,
        plan: tuple[Frame, ...],
        seq: int,
        peer_depth: int,
    ) -> None:
        self._pair = pair
        self._link = pair.link
        self._staging = pair.staging
        self._cache = pair.cache
        self._transfer = transfer
        self._control = transfer.control
        self._seq = seq
        self._key = transfer_key(transfer.transfer_id)
        self._plan = plan
        self._depth = pair.depth
        self._peer_depth = peer_depth
        self._lbb = pair.layer_block_bytes
        self._inflight: list[FrameOps | None] = [None] * self._depth

    def run(self) -> None:
        """Send every frame (or ABORT + fillers) and wait until all of it is on the wire."""
        try:
            for frame in self._plan:
                slot = frame.index % self._depth
                self._drain(slot)
                if frame.direct:  # pieces of at most two frames on the wire: abort()'s wait
                    for back in range(2, self._depth):
                        self._drain((frame.index - back) % self._depth)
                ops = self._send(frame, slot)
                if ops is None:  # ended (abort, timeout, peer's abort): tell the receiver
                    self._send_abort(frame.index)
                    break
                self._inflight[slot] = ops
            for slot in range(self._depth):
                self._drain(slot)
        except BaseException:
            for ops in self._inflight:  # the leases end before the transfer fails
                if ops is not None:
                    ops.abandon(self._link)
            raise

    def _send(self, frame: Frame, slot: int) -> FrameOps | None:
        """Pack and post the frame's messages; None if the transfer ended first.

        The pack and the direct pieces read the blocks under a lease, which the pieces
        keep until they are on the wire (``_drain``)."""
        transfer, control = self._transfer, self._control
        if transfer.mode is TransferMode.LAYERWISE:
            while not control.wait_for_layers(
                frame.chunk.layer_stop, max(transfer.deadline - time.monotonic(), 0.0) + 0.01
            ):
                if transfer.state.terminal:
                    return None
                control.expire(time.monotonic())
        if not control.lease():
            return None
        self._pair.after_compute(transfer.ready_event(frame.chunk.layer_stop))
        ops = FrameOps(control)
        try:
            buf = self._staging.frame(slot, frame.staged_bytes(self._lbb))
            if frame.staged:
                ids = staged_ids(transfer.block_ids, frame, self._cache.device)
                pack_staged(self._cache, ids, frame, buf)
            views = piece_views(self._cache, transfer.block_ids, frame)
            Header(
                Kind.DATA,
                self._key,
                self._seq,
                frame.index,
                value=frame.staged_bytes(self._lbb),
                direct=len(views),
            ).write(buf)
            ops.works.append(self._link.isend(buf, TAG_DATA))
            for view in views:
                ops.works.append(self._link.isend(view, TAG_DATA))
        except BaseException:
            ops.abandon(self._link)
            raise
        if not frame.direct:  # the payload is a copy: the blocks are no longer read
            ops.leased = None
            control.return_lease()
        n = len(transfer.block_ids)
        control.add_progress(frame.nbytes(self._lbb), frame.chunk.layers_complete(n))
        return ops

    def _send_abort(self, index: int) -> None:
        """ABORT(index) plus fillers for everything else the receiver has posted by the
        time it reads it (the same :func:`post_limit` rule it follows): a filler ABORT for
        each later first message, and filler pieces (scratch of the planned sizes) for the
        direct pieces of every one of those frames, ``index`` included."""
        code = error_reason(self._transfer.error)
        for i in range(index, post_limit(self._plan, index, self._peer_depth)):
            frame, slot = self._plan[i], i % self._depth
            self._drain(slot)
            buf = self._staging.frame(slot, frame.staged_bytes(self._lbb))
            Header(Kind.ABORT, self._key, self._seq, i, code=code).write(buf)
            ops = self._inflight[slot] = FrameOps(None)
            ops.works.append(self._link.isend(buf, TAG_DATA))
            for piece in frame.pieces():
                filler = piece_scratch(self._staging, self._cache.layout, piece)
                ops.works.append(self._link.isend(filler, TAG_DATA))

    def _drain(self, slot: int) -> None:
        ops, self._inflight[slot] = self._inflight[slot], None
        if ops is not None:
            ops.finish(self._link, self._pair.wire_timeout(self._transfer), "DATA")
