"""One transfer's frames arriving at the receiver: posted, checked, landed — in that order.

For each frame i of the plan (:mod:`kv_transfer.segments`) the sender sends its first
message Fi (header + staged payload) and then its direct pieces Pi. Messages match in the
order they are posted, so this side posts exactly F0 P0 F1 P1 …, ``depth`` frames ahead of
the landing (:func:`~kv_transfer.segments.post_limit`; the first ones before ACCEPT):

* Fi goes into staging slot ``i % depth``;
* Pi goes straight into the destination blocks, under a lease on the transfer's blocks
  (``TransferControl.lease``) that ends once the pieces have arrived — or, for a transfer
  that already ended here (aborted, timed out), into scratch. The sender is committed to every
  posted frame once it has ACCEPT: it sends it, or an ABORT with filler pieces of the
  same sizes, so a lease never waits on bytes nobody will send.

Pieces are posted before their header is checked, so that the wire never waits for this
thread. That is safe because they can only land in this transfer's own blocks: a header
that does not match the plan fails the transfer (its blocks are freed, never decoded) and
tears the pair down.

Landing frame i checks its header, scatters its staged payload (if the transfer is still
live), waits for its pieces and returns the lease, then posts frame ``i + depth``. An ABORT
from the sender ends the loop: the pieces already posted receive its fillers, and the
filler ABORTs that stand for the other posted first messages are drained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from kv_transfer.errors import ProtocolError, TransferError
from kv_transfer.packing import piece_scratch, piece_views, staged_ids, unpack_staged
from kv_transfer.segments import Frame, post_limit
from kv_transfer.torch_dist import FrameOps, PairContext
from kv_transfer.transfer import RecvTransfer
from kv_transfer.wire import TAG_DATA, Header, Kind


@dataclass(slots=True)
class Posted:
    """A frame whose receives are posted: its first message, and its pieces' operations."""

    first: dist.Work
    buffer: torch.Tensor
    pieces: FrameOps


class Landing:
    """The receiving loop of one transfer on one pair (the pair's thread only)."""

    def __init__(
        self,
        pair: PairContext,
        transfer: RecvTransfer,
        begin: Header,
        plan: tuple[Frame, ...],
    ) -> None:
        self._pair = pair
        self._link = pair.link
        self._staging = pair.staging
        self._cache = pair.cache
        self._transfer = transfer
        self._control = transfer.control
        self._begin = begin  # the sender's BEGIN: every frame carries its key and seq
        self._plan = plan
        self._depth = pair.depth
        self._lbb = pair.layer_block_bytes
        self._posted: dict[int, Posted] = {}  # frames posted and not landed, by index
        self._next = 0  # the next frame to post
        self._landed = 0
        self.sender_code: int | None = None  # the reason of the sender's ABORT, if any

    def post_ahead(self) -> None:
        """Post the frames that may be posted now (called before ACCEPT, too)."""
        while self._next < post_limit(self._plan, self._landed, self._depth):
            self._post(self._plan[self._next])
            self._next += 1

    def run(self) -> None:
        """Land every frame, or stop at the sender's ABORT (``sender_code`` set)."""
        try:
            for frame in self._plan:
                if not self._check(frame):
                    self._drain_fillers(frame.index)
                    return
                self._land(frame)
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        """Error path: end every posted operation (which closes the link) and its lease,
        so the transfer's ``release`` can run before it fails."""
        for posted in self._posted.values():
            posted.pieces.abandon(self._link)
        self._posted.clear()

    # ---- steps -----------------------------------------------------------------------

    def _post(self, frame: Frame) -> None:
        k = frame.index
        buf = self._staging.frame(k % self._depth, frame.staged_bytes(self._lbb))
        first = self._link.irecv(buf, TAG_DATA)
        leased = bool(frame.direct) and self._control.lease()
        ops = FrameOps(self._control if leased else None)
        self._posted[k] = Posted(first, buf, ops)  # from here run() abandons it on failure
        if leased:
            views = piece_views(self._cache, self._transfer.block_ids, frame)
        else:  # nothing, or a transfer that ended here: its pieces are drained into scratch
            views = [piece_scratch(self._staging, self._cache.layout, p) for p in frame.pieces()]
        for view in views:
            ops.works.append(self._link.irecv(view, TAG_DATA))

    def _read(self, index: int, kinds: tuple[Kind, ...]) -> Header:
        posted = self._posted[index]
        self._link.wait(posted.first, self._wire_timeout(), "DATA")
        header = Header.read(posted.buffer)
        begin = self._begin
        if (
            header.kind not in kinds
            or header.key != begin.key
            or header.seq != begin.seq
            or header.index != index
        ):
            raise ProtocolError(
                f"{self._transfer.transfer_id}: expected frame {index} of seq {begin.seq}, "
                f"got {header}"
            )
        return header

    def _check(self, frame: Frame) -> bool:
        """Read and check the frame's header; False on the sender's ABORT."""
        header = self._read(frame.index, (Kind.DATA, Kind.ABORT))
        if header.kind is Kind.ABORT:
            self.sender_code = header.code
            return False
        pieces = len(frame.pieces())
        if header.value != frame.staged_bytes(self._lbb) or header.direct != pieces:
            raise ProtocolError(
                f"{self._transfer.transfer_id}: frame {frame.index} announces "
                f"{header.value} staged bytes and {header.direct} pieces, the plan says "
                f"{frame.staged_bytes(self._lbb)} and {pieces}"
            )
        return True

    def _land(self, frame: Frame) -> None:
        posted = self._posted.pop(frame.index)
        transfer, control = self._transfer, self._control
        failure: Exception | None = None
        if frame.staged and control.lease():  # still live: the blocks are ours to write
            try:
                ids = staged_ids(transfer.block_ids, frame, self._cache.device)
                unpack_staged(self._cache, ids, frame, posted.buffer)
            except Exception as exc:
                failure = exc
            finally:
                control.return_lease()
        posted.pieces.finish(self._link, self._wire_timeout(), "DATA")  # abandons on failure
        self._landed = frame.index + 1
        self.post_ahead()
        if failure is not None:
            control.fail(
                TransferError(
                    f"{transfer.transfer_id}: landing chunk {frame.index} failed: {failure}"
                )
            )
        elif not transfer.state.terminal:
            n = len(transfer.block_ids)
            control.add_progress(frame.nbytes(self._lbb), frame.chunk.layers_complete(n))

    def _drain_fillers(self, index: int) -> None:
        """After ABORT(index): the posted pieces receive the sender's fillers, and the
        filler ABORTs stand for the first messages posted after it."""
        for k in range(index, self._next):
            if k > index:
                self._read(k, (Kind.ABORT,))
            self._posted.pop(k).pieces.finish(self._link, self._wire_timeout(), "DATA")

    def _wire_timeout(self) -> float:
        return self._pair.wire_timeout(self._transfer)
