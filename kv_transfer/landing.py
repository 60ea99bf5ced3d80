"""One transfer's frames arriving at the receiver: posted, checked, landed — in that order.

For each frame i of the plan (:mod:`kv_transfer.segments`) the sender sends its first
message Fi (header + staged payload) and then its direct pieces Pi. Messages match in the
order they are posted, so this side posts exactly F0 P0 F1 P1 …, and:

* first messages go into staging slots, up to ``depth`` frames ahead of the landing, but
  never past a frame whose pieces are still unposted (:func:`~kv_transfer.segments.post_limit`);
* a frame's pieces are posted only once its header has been checked — they land straight
  in the destination blocks, so a stale or misordered frame must be refused before any of
  its bytes can arrive — under a lease on the transfer's blocks (``Transfer._lease``);
  a transfer that already ended (aborted or timed out here) gets them into scratch;
* in whole mode, frame i+1's header is checked and its pieces posted while frame i's
  pieces are still streaming, so the wire never waits for this thread; layer-wise frames
  are not waited for ahead of time (the next layer may not be computed yet).

Landing frame i scatters its staged payload (if the transfer is still live), waits for its
pieces and returns the lease. An ABORT from the sender ends the loop after the frames
before it; the filler ABORTs it sent for the other posted first messages are drained.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from engine.kv_cache import KVCache, torch_dtype
from kv_transfer.errors import ProtocolError, TransferError
from kv_transfer.packing import (
    Staging,
    layer_block_bytes,
    piece_views,
    staged_ids,
    unpack_staged,
)
from kv_transfer.segments import Frame, Piece, post_limit
from kv_transfer.torch_dist import FrameOps, Link, wire_timeout
from kv_transfer.transfer import RecvTransfer
from kv_transfer.types import TransferMode
from kv_transfer.wire import TAG_DATA, Header, Kind


class Landing:
    """The receiving loop of one transfer on one pair (the pair's thread only)."""

    def __init__(
        self,
        link: Link,
        staging: Staging,
        cache: KVCache,
        transfer: RecvTransfer,
        begin: Header,
        plan: tuple[Frame, ...],
        mode: TransferMode,
        depth: int,
        grace_s: float,
    ) -> None:
        self._link = link
        self._staging = staging
        self._cache = cache
        self._transfer = transfer
        self._begin = begin
        self._plan = plan
        self._lookahead = mode is TransferMode.WHOLE
        self._depth = depth
        self._grace_s = grace_s
        self._lbb = layer_block_bytes(cache.layout)
        self._posted = 0  # first messages posted: frames [0, posted)
        self._verified = 0  # frames whose DATA header was checked and pieces posted
        self._landed = 0
        self._first: dict[int, tuple[dist.Work, torch.Tensor]] = {}  # posted, not yet read
        self._opened: dict[int, tuple[torch.Tensor, FrameOps]] = {}  # checked, not landed
        self._abort_at: int | None = None
        self.sender_code: int | None = None  # the reason of the sender's ABORT, if any

    def post_ahead(self) -> None:
        """Post the first messages that may be posted now (called before ACCEPT, too)."""
        limit = post_limit(self._plan, self._landed, self._verified, self._depth)
        while self._posted < limit:
            k = self._posted
            buf = self._staging.frame(k % self._depth, self._plan[k].staged_bytes(self._lbb))
            self._first[k] = (self._link.irecv(buf, TAG_DATA), buf)
            self._posted += 1

    def run(self) -> None:
        """Land every frame, or stop at the sender's ABORT (``sender_code`` set)."""
        try:
            for frame in self._plan:
                i = frame.index
                if i == self._verified and not self._open(frame):
                    break  # ABORT(i)
                ahead = self._plan[i + 1] if i + 1 < len(self._plan) else None
                if self._lookahead and ahead and ahead.direct and self._verified == i + 1:
                    self._open(ahead)  # an ABORT here ends the loop after frame i
                self._land(frame)
                if self._abort_at is not None:
                    break
            if self._abort_at is not None:
                self._drain_fillers(self._abort_at)
        except BaseException:
            for _, ops in self._opened.values():
                ops.abandon(self._link)  # the leases end before the transfer fails
            self._opened.clear()
            raise

    # ---- steps -----------------------------------------------------------------------

    def _read(self, index: int, kinds: tuple[Kind, ...]) -> tuple[Header, torch.Tensor]:
        work, buf = self._first.pop(index)
        self._link.wait(work, self._wire_timeout(), "DATA")
        header = Header.read(buf)
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
        return header, buf

    def _open(self, frame: Frame) -> bool:
        """Check frame's header and post its pieces; False on ABORT."""
        header, buf = self._read(frame.index, (Kind.DATA, Kind.ABORT))
        if header.kind is Kind.ABORT:
            self._abort_at, self.sender_code = frame.index, header.code
            return False
        pieces = frame.pieces()
        if header.value != frame.staged_bytes(self._lbb) or header.direct != len(pieces):
            raise ProtocolError(
                f"{self._transfer.transfer_id}: frame {frame.index} announces "
                f"{header.value} staged bytes and {header.direct} pieces, the plan says "
                f"{frame.staged_bytes(self._lbb)} and {len(pieces)}"
            )
        leased = self._transfer._lease()
        ops = FrameOps(self._transfer if leased else None)
        self._opened[frame.index] = (buf, ops)
        if leased:
            views = piece_views(self._cache, self._transfer.block_ids, frame)
        else:  # ended here: drain them into scratch
            views = [self._scratch(piece) for piece in pieces]
        for view in views:  # may raise: run() abandons the opened frames
            ops.works.append(self._link.irecv(view, TAG_DATA))
        self._verified = frame.index + 1
        self.post_ahead()
        return True

    def _land(self, frame: Frame) -> None:
        buf, ops = self._opened.pop(frame.index)
        transfer = self._transfer
        leased = ops.transfer is not None
        failure: Exception | None = None
        if leased and frame.staged and not transfer.state.terminal:
            try:
                ids = staged_ids(transfer.block_ids, frame, self._cache.device)
                unpack_staged(self._cache, ids, frame, buf)
            except Exception as exc:
                failure = exc
        ops.finish(self._link, self._wire_timeout(), "DATA")  # abandons itself on failure
        self._landed = frame.index + 1
        self.post_ahead()
        if failure is not None:
            transfer._fail(
                TransferError(
                    f"{transfer.transfer_id}: landing chunk {frame.index} failed: {failure}"
                )
            )
        elif leased and not transfer.state.terminal:
            n = len(transfer.block_ids)
            transfer._progress(frame.nbytes(self._lbb), frame.chunk.layers_complete(n))

    def _drain_fillers(self, index: int) -> None:
        """Receive the filler ABORTs for the first messages posted after ABORT(index)."""
        for k in range(index + 1, self._posted):
            self._read(k, (Kind.ABORT,))

    def _scratch(self, piece: Piece) -> torch.Tensor:
        """Where a piece of a transfer that already ended is received (and dropped)."""
        _, _, start, stop = piece
        shape = (stop - start, *self._cache.layout.block_shape)
        nbytes = self._lbb // 2 * (stop - start)
        dtype = torch_dtype(self._cache.layout.dtype)
        return self._staging.scratch(nbytes).view(dtype).view(shape)

    def _wire_timeout(self) -> float:
        return wire_timeout(self._transfer, self._grace_s)
