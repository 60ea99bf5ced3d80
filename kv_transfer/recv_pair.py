"""The receiver's half of one (sender, receiver) pair: the thread that lands its frames.

Between transfers the thread waits for a BEGIN (or CANCEL) frame; it serves one transfer
at a time, in the order the sender sent them, into the blocks the caller reserved with
``expect``. A transfer's life here:

    expected (registered, waiting; fails by itself at its deadline)
      → claimed by a pair on BEGIN (checks: known id, still pending, same block count)
      → landing (frame by frame, in layer order; ``layers_landed`` grows)
      → done | failed  → RESULT tells the sender

Landing chunk i overlaps receiving the next ``pipeline_depth - 1`` frames, whose receives
are already posted. Failure handling:

* ``abort()`` / deadline / ``close()`` make the transfer terminal at once (its ``release``
  runs). If it was already on the wire, an abort flag in the store tells the sender, who
  answers with ABORT frames; meanwhile the pair drains (receives without landing), so no
  block is written after ``release`` and the pair stays usable.
* The sender's abort arrives as ABORT frames; its death as a broken connection, which
  fails the transfer in flight and ends the pair (a restarted sender joins anew).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from engine.kv_cache import KVCache
from kv_transfer.errors import ProtocolError, TransferError
from kv_transfer.expected import ExpectedTransfers
from kv_transfer.packing import Staging, block_index, layer_block_bytes, unpack
from kv_transfer.rendezvous import connect_store, new_pair_group
from kv_transfer.torch_dist import Link, classify, wire_timeout
from kv_transfer.transfer import RecvTransfer
from kv_transfer.types import PeerAddress, TransferConfig, TransferState
from kv_transfer.wire import (
    CODE_MODES,
    HEADER_BYTES,
    TAG_CTRL,
    TAG_DATA,
    Chunk,
    Header,
    Kind,
    Reason,
    error_reason,
    plan_chunks,
    reason_error,
)

log = logging.getLogger(__name__)


class ReceiverPair:
    """The receiver's half of one pair: a thread that lands whatever this sender sends."""

    def __init__(
        self,
        index: int,
        peer_name: str,
        cache: KVCache,
        config: TransferConfig,
        address: PeerAddress,
        expected: ExpectedTransfers,
        on_exit: Callable[[int], None],
    ) -> None:
        self.index = index
        self.peer = f"sender {peer_name}"
        self._cache = cache
        self._config = config
        self._address = address
        self._expected = expected
        self._on_exit = on_exit
        self._layer_block_bytes = layer_block_bytes(cache.layout)
        self._depth = config.pipeline_depth
        self._staging = Staging(cache.device, slots=self._depth)
        self._thread = threading.Thread(target=self._run, name=f"kv-recv-{index}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cfg = self._config
        try:
            rendezvous = connect_store(self._address, cfg.connect_timeout_s)
            group = new_pair_group(
                rendezvous, self.index, 0, self._cache.device, cfg.host, cfg.connect_timeout_s
            )
        except (TransferError, RuntimeError) as exc:
            log.warning("pair %d with %s never formed: %s", self.index, self.peer, exc)
            self._on_exit(self.index)
            return
        link = Link(group, 0, self.index, self.peer)
        try:
            seq = 0
            while True:
                rx = self._staging.rx_control
                link.wait(link.irecv(rx, TAG_CTRL), cfg.idle_timeout_s, "waiting for BEGIN")
                header = Header.read(rx)
                if header.kind is Kind.CANCEL:
                    self._expected.cancel(header.key, header.code, self.peer)
                    continue
                if header.kind is not Kind.BEGIN or header.seq != seq + 1:
                    raise ProtocolError(f"expected BEGIN seq {seq + 1}, got {header}")
                seq = header.seq
                if not self._serve(link, header):
                    return
        except TransferError as exc:
            log.info("pair %d with %s closed: %s", self.index, self.peer, exc)
        finally:
            link.close()
            self._on_exit(self.index)

    def _serve(self, link: Link, begin: Header) -> bool:
        """One transfer; False when the pair should close (receiver shutting down)."""
        transfer, reason = self._expected.claim(begin)
        if transfer is None:
            self._reply(link, Kind.REJECT, begin, reason, None)
            return reason is not Reason.CLOSING
        try:
            self._land(link, begin, transfer)
        except Exception as exc:  # whatever broke, the blocks go back and the pair closes
            error = classify(exc, f"landing {transfer.transfer_id}")
            transfer._fail(error)
            raise error from exc
        finally:
            self._expected.settle(begin.key)
        return True

    def _land(self, link: Link, begin: Header, transfer: RecvTransfer) -> None:
        layout = self._cache.layout
        n = len(transfer.block_ids)
        plan = plan_chunks(
            n, layout.num_layers, self._layer_block_bytes, CODE_MODES[begin.code], begin.value
        )
        ids = block_index(transfer.block_ids, self._cache.device)
        # Frames i .. i+depth-1 stay posted while frame i lands (the sender relies on it).
        depth = self._depth
        posted = [self._post(link, plan, i) for i in range(min(depth, len(plan)))]
        # Not waited for here: under CPU contention its completion can lag the first frame.
        accept = self._reply(link, Kind.ACCEPT, begin, Reason.OK, transfer, wait=False, value=depth)
        sender_code: int | None = None
        for chunk in plan:
            header, frame = self._next_frame(link, transfer, begin, posted, chunk.index)
            if header.kind is Kind.ABORT:
                sender_code = header.code
                for filler in range(chunk.index + 1, min(chunk.index + depth, len(plan))):
                    self._next_frame(link, transfer, begin, posted, filler)
                break
            self._land_chunk(transfer, ids, chunk, frame)
            if chunk.index + depth < len(plan):
                posted[chunk.index % depth] = self._post(link, plan, chunk.index + depth)
        if sender_code is not None:
            transfer._fail(reason_error(sender_code, transfer.transfer_id, self.peer))
        else:
            transfer._succeed()
        code = Reason.OK if transfer.state is TransferState.DONE else error_reason(transfer.error)
        link.wait(accept, wire_timeout(transfer, self._config.grace_s), "ACCEPT")
        self._reply(link, Kind.RESULT, begin, code, transfer)

    def _next_frame(
        self,
        link: Link,
        transfer: RecvTransfer,
        begin: Header,
        posted: list[tuple[dist.Work, torch.Tensor]],
        index: int,
    ) -> tuple[Header, torch.Tensor]:
        work, frame = posted[index % self._depth]
        link.wait(work, wire_timeout(transfer, self._config.grace_s), "DATA")
        header = Header.read(frame)
        if (
            header.kind not in (Kind.DATA, Kind.ABORT)
            or header.key != begin.key
            or header.seq != begin.seq
            or header.index != index
            or (header.kind is Kind.DATA and header.value != frame.numel() - HEADER_BYTES)
        ):
            raise ProtocolError(
                f"{transfer.transfer_id}: expected frame {index} of seq {begin.seq}, got {header}"
            )
        return header, frame

    def _land_chunk(
        self, transfer: RecvTransfer, ids: torch.Tensor, chunk: Chunk, frame: torch.Tensor
    ) -> None:
        failure: Exception | None = None
        nbytes = 0
        with transfer._touching_blocks() as live:
            if live:  # else: aborted or timed out here; drain without touching the blocks
                try:
                    nbytes = unpack(self._cache, ids, chunk, frame)
                except Exception as exc:
                    failure = exc
        if failure is not None:
            transfer._fail(
                TransferError(
                    f"{transfer.transfer_id}: landing chunk {chunk.index} failed: {failure}"
                )
            )
        elif live:
            transfer._progress(nbytes, chunk.layers_complete(len(transfer.block_ids)))

    def _post(
        self, link: Link, plan: tuple[Chunk, ...], index: int
    ) -> tuple[dist.Work, torch.Tensor]:
        frame = self._staging.frame(
            index % self._depth, plan[index].nbytes(self._layer_block_bytes)
        )
        return link.irecv(frame, TAG_DATA), frame

    def _reply(
        self,
        link: Link,
        kind: Kind,
        begin: Header,
        code: int,
        transfer: RecvTransfer | None,
        wait: bool = True,
        value: int = 0,
    ) -> dist.Work:
        """Send a control frame; waits for it unless ``wait`` is False (then the caller
        must wait before ``tx_control`` is written again)."""
        tx = self._staging.tx_control
        Header(kind, begin.key, begin.seq, code=int(code), value=value).write(tx)
        work = link.isend(tx, TAG_CTRL)
        if wait:
            timeout = (
                wire_timeout(transfer, self._config.grace_s) if transfer else self._config.grace_s
            )
            link.wait(work, timeout, kind.name)
        return work
