"""Decode side of the torch.distributed transport.

The receiver hosts the rendezvous store (its ``address`` is what the prefill worker is
told), accepts any number of senders (one pair and thread each), and lands transfers
into blocks the caller reserved. A transfer's life here:

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

import contextlib
import logging
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from engine.kv_cache import KVCache
from kv_transfer.errors import (
    ProtocolError,
    TransferAborted,
    TransferError,
    TransferRejected,
)
from kv_transfer.interfaces import KVReceiver
from kv_transfer.metrics import TransferStats
from kv_transfer.packing import Staging, block_index, layer_block_bytes, unpack
from kv_transfer.rendezvous import Acceptor, connect_store, new_pair_group, start_store
from kv_transfer.torch_dist import Link, Monitor, classify, handshake_for, wire_timeout
from kv_transfer.transfer import RecvTransfer, ReleaseFn
from kv_transfer.types import (
    Handshake,
    PeerAddress,
    RecvSpec,
    TransferConfig,
    TransferState,
)
from kv_transfer.wire import (
    CODE_MODES,
    TAG_CTRL,
    TAG_DATA,
    Chunk,
    Header,
    Kind,
    Reason,
    error_reason,
    plan_chunks,
    reason_error,
    transfer_key,
)

log = logging.getLogger(__name__)

RETAIN_S = 60.0  # finished transfers stay known this long, so a late BEGIN gets the real cause


class TorchDistReceiver(KVReceiver):
    """Lands transfers from any number of senders into ``cache``."""

    def __init__(
        self,
        cache: KVCache,
        model: str,
        config: TransferConfig | None = None,
        *,
        stats: TransferStats | None = None,
    ) -> None:
        self.cache = cache
        self.config = config or TransferConfig()
        self.handshake = handshake_for(cache, model)
        self.stats = stats or TransferStats()
        cfg = self.config
        store, self._socket = start_store(cfg.host, cfg.port, cfg.connect_timeout_s)
        self._address = PeerAddress(cfg.host, self._socket.getsockname()[1])
        self._expected = _Expected(store, self.stats, cfg.max_chunk_bytes)
        self._lock = threading.Lock()
        self._pairs: dict[int, _ReceiverPair] = {}
        self._acceptor = Acceptor(store, self.handshake, self._on_join, cfg.idle_timeout_s)
        self._monitor = Monitor(cfg.poll_interval_s, self._expected.expire, "kv-recv-monitor")

    @property
    def address(self) -> PeerAddress:
        return self._address

    def expect(self, spec: RecvSpec, release: ReleaseFn) -> RecvTransfer:
        layout = self.cache.layout
        if max(spec.block_ids) >= layout.num_blocks:
            raise ValueError(f"block id out of range for a cache of {layout.num_blocks} blocks")
        return self._expected.add(
            spec, layout.num_layers, spec.timeout_s or self.config.timeout_s, release
        )

    def close(self) -> None:
        self._acceptor.stop()
        self._expected.close()
        self._monitor.stop()

    def num_pairs(self) -> int:
        with self._lock:
            return len(self._pairs)

    def _on_join(self, index: int, name: str, handshake: Handshake) -> str | None:
        if self._expected.closed:
            return "receiver is closing"
        with self._lock:
            self._pairs[index] = _ReceiverPair(
                index,
                name,
                self.cache,
                self.config,
                self._address,
                self._expected,
                on_exit=self._forget_pair,
            )
        return None

    def _forget_pair(self, index: int) -> None:
        with self._lock:
            self._pairs.pop(index, None)


class _Expected:
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
            transfer._fail(TransferRejected(f"{transfer.transfer_id}: bad BEGIN {begin}"))
            return None, Reason.BAD_REQUEST
        if begin.num_blocks != len(transfer.block_ids):
            transfer._fail(
                TransferRejected(
                    f"{transfer.transfer_id}: sender has {begin.num_blocks} blocks, "
                    f"{len(transfer.block_ids)} were reserved"
                )
            )
            return None, Reason.BLOCK_COUNT
        if not transfer._start():
            return None, error_reason(transfer.error) if transfer.error else Reason.NOT_PENDING
        return transfer, Reason.OK

    def cancel(self, key: int, code: int, peer: str) -> None:
        with self._lock:
            transfer = self._by_key.get(key)
        if transfer is not None and transfer.state is TransferState.PENDING:
            transfer._fail(reason_error(code, transfer.transfer_id, peer))

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
            transfer._expire(now)
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
            transfer._fail(TransferAborted(f"{transfer.transfer_id}: receiver closed"))

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


class _ReceiverPair:
    """The receiver's half of one pair: a thread that lands whatever this sender sends."""

    def __init__(
        self,
        index: int,
        peer_name: str,
        cache: KVCache,
        config: TransferConfig,
        address: PeerAddress,
        expected: _Expected,
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
