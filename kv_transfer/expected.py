"""The receiver's table of expected transfers and the abort flags it publishes.

``add`` registers a transfer (from ``expect``); a pair ``claim``s it when its BEGIN
arrives (known id, still pending, same block count — else the reason to refuse);
``expire`` fails transfers past their deadline; a failure that originates here while the
transfer is on the wire sets ``abort/<key>`` in the store so the sender stops (``settle``
removes the flag once the transfer left the wire). Finished transfers stay known for
``RETAIN_S`` so that a late BEGIN is refused with the real cause.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch.distributed as dist

from kv_transfer.errors import TransferAborted, TransferError, TransferRejected
from kv_transfer.metrics import TransferStats
from kv_transfer.transfer import RecvTransfer, ReleaseFn
from kv_transfer.types import RecvSpec, TransferState
from kv_transfer.wire import CODE_MODES, Header, Reason, error_reason, reason_error, transfer_key

log = logging.getLogger(__name__)

RETAIN_S = 60.0  # finished transfers stay known this long, so a late BEGIN gets the real cause


class ExpectedTransfers:
    """Registered transfers by key, and the abort flags published for the senders."""

    def __init__(self, store: dist.TCPStore, stats: TransferStats, max_chunk_bytes: int) -> None:
        self._store = store  # the store server's own client: set/delete only, never waits
        self._stats = stats
        self._max_chunk_bytes = max_chunk_bytes
        self._lock = threading.Lock()
        self._by_key: dict[int, RecvTransfer] = {}
        self._flagged: set[int] = set()
        self.closed = False

    def add(
        self, spec: RecvSpec, num_layers: int, timeout_s: float, release: ReleaseFn
    ) -> RecvTransfer:
        key = transfer_key(spec.transfer_id)
        with self._lock:
            if self.closed:
                raise RuntimeError("receiver is closed")
            old = self._by_key.get(key)
            if old is not None and not old.state.terminal:
                raise ValueError(f"transfer {spec.transfer_id!r} is already expected")
            transfer = RecvTransfer(
                spec.transfer_id,
                spec.block_ids,
                num_layers,
                timeout_s,
                release,
                stats=self._stats,
                on_failure=self._publish_failure,
            )
            self._by_key[key] = transfer
        return transfer

    def claim(self, begin: Header) -> tuple[RecvTransfer | None, Reason]:
        """Start the transfer a BEGIN names, or say why not."""
        with self._lock:
            closed, transfer = self.closed, self._by_key.get(begin.key)
        if closed:
            return None, Reason.CLOSING
        if transfer is None:
            return None, Reason.UNKNOWN_TRANSFER
        if begin.code not in CODE_MODES or not 0 < begin.value <= self._max_chunk_bytes:
            transfer.control.fail(TransferRejected(f"{transfer.transfer_id}: bad BEGIN {begin}"))
            return None, Reason.BAD_REQUEST
        if begin.num_blocks != len(transfer.block_ids):
            transfer.control.fail(
                TransferRejected(
                    f"{transfer.transfer_id}: sender has {begin.num_blocks} blocks, "
                    f"{len(transfer.block_ids)} were reserved"
                )
            )
            return None, Reason.BLOCK_COUNT
        if not transfer.control.start():
            return None, error_reason(transfer.error) if transfer.error else Reason.NOT_PENDING
        return transfer, Reason.OK

    def cancel(self, key: int, code: int, peer: str) -> None:
        with self._lock:
            transfer = self._by_key.get(key)
        if transfer is not None and transfer.state is TransferState.PENDING:
            transfer.control.fail(reason_error(code, transfer.transfer_id, peer))

    def settle(self, key: int) -> None:
        """The transfer left the wire: its abort flag, if any, is no longer needed."""
        with self._lock:
            flagged = key in self._flagged
            self._flagged.discard(key)
        if flagged:
            with contextlib.suppress(RuntimeError):
                self._store.delete_key(f"abort/{key}")

    def expire(self, now: float) -> None:
        with self._lock:
            transfers = list(self._by_key.items())
        stale = []
        for key, transfer in transfers:
            transfer.control.expire(now)
            if transfer.ended_at is not None and now - transfer.ended_at > RETAIN_S:
                stale.append((key, transfer))
        with self._lock:
            for key, transfer in stale:
                if self._by_key.get(key) is transfer:
                    del self._by_key[key]

    def close(self) -> None:
        with self._lock:
            self.closed = True
            transfers = list(self._by_key.values())
        for transfer in transfers:
            transfer.control.fail(TransferAborted(f"{transfer.transfer_id}: receiver closed"))

    def _publish_failure(self, transfer: RecvTransfer, error: TransferError) -> None:
        # Only a transfer already on the wire needs the sender told out of band; a pending
        # one is refused when its BEGIN arrives.
        if error.by_peer or transfer.started_at is None:
            return
        key = transfer_key(transfer.transfer_id)
        try:
            self._store.set(f"abort/{key}", str(int(error_reason(error))))
        except RuntimeError:
            log.warning("could not publish the abort of %s", transfer.transfer_id)
            return
        with self._lock:
            self._flagged.add(key)
