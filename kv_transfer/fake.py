"""In-process fake of the KV transport, for unit tests of the workers.

Same interfaces, same :class:`~kv_transfer.transfer.Transfer` objects and the same block
contract (``release`` exactly once; no block touched after it) as the torch.distributed
transport, and the same packing code — but frames are copies between two ``KVCache``
objects of one process, so tests need no sockets, processes or timing luck. Semantics
mirrored from the real transport: handshake refusal, unknown / finished / mismatched
transfers rejected, FIFO per (sender, receiver), layer-wise sends waiting for
``mark_layer_ready``, aborts and deadlines on either side reaching the other.

Fault injection on the :class:`FakeNetwork`: ``fail_next(address, error, after_chunks)``
breaks the next transfer to a receiver mid-way (both sides fail with ``error``, as when a
connection drops), ``set_down(address)`` makes a receiver unreachable, and
``chunk_delay_s`` slows every frame so a test can abort in the middle.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque

from engine.kv_cache import KVCache
from kv_transfer.errors import (
    IncompatiblePeer,
    PeerLost,
    TransferAborted,
    TransferError,
    TransferRejected,
)
from kv_transfer.interfaces import KVReceiver, KVSender
from kv_transfer.metrics import TransferStats
from kv_transfer.packing import Staging, block_index, layer_block_bytes, pack, unpack
from kv_transfer.torch_dist import Monitor, handshake_for
from kv_transfer.transfer import RecvTransfer, ReleaseFn, SendTransfer, Transfer
from kv_transfer.types import PeerAddress, RecvSpec, SendSpec, TransferConfig, TransferMode
from kv_transfer.wire import Reason, error_reason, plan_chunks, reason_error

_Fault = tuple[TransferError, int]  # (error both sides fail with, chunks delivered before it)


class FakeNetwork:
    """Where fake receivers are found by address; owns the fault-injection knobs."""

    def __init__(self, chunk_delay_s: float = 0.0) -> None:
        self.chunk_delay_s = chunk_delay_s
        self._lock = threading.Lock()
        self._receivers: dict[PeerAddress, FakeReceiver] = {}
        self._down: set[PeerAddress] = set()
        self._faults: dict[PeerAddress, _Fault] = {}
        self._ports = itertools.count(1)

    def receiver(
        self, cache: KVCache, model: str, config: TransferConfig | None = None
    ) -> FakeReceiver:
        address = PeerAddress("fake", next(self._ports))
        receiver = FakeReceiver(cache, model, address, config)
        with self._lock:
            self._receivers[address] = receiver
        return receiver

    def sender(
        self, cache: KVCache, model: str, config: TransferConfig | None = None
    ) -> FakeSender:
        return FakeSender(cache, model, self, config)

    def set_down(self, address: PeerAddress, down: bool = True) -> None:
        with self._lock:
            (self._down.add if down else self._down.discard)(address)

    def fail_next(self, address: PeerAddress, error: TransferError, after_chunks: int = 0) -> None:
        with self._lock:
            self._faults[address] = (error, after_chunks)

    def _lookup(self, address: PeerAddress) -> tuple[FakeReceiver | None, _Fault | None]:
        with self._lock:
            if address in self._down:
                return None, None
            return self._receivers.get(address), self._faults.pop(address, None)


class FakeReceiver(KVReceiver):
    def __init__(
        self, cache: KVCache, model: str, address: PeerAddress, config: TransferConfig | None
    ) -> None:
        self.cache = cache
        self.config = config or TransferConfig()
        self.handshake = handshake_for(cache, model)
        self.stats = TransferStats()
        self._address = address
        self._lock = threading.Lock()
        self._expected: dict[str, RecvTransfer] = {}
        self._closed = False
        self._monitor = Monitor(self.config.poll_interval_s, self._tick, "fake-recv-monitor")

    @property
    def address(self) -> PeerAddress:
        return self._address

    def expect(self, spec: RecvSpec, release: ReleaseFn) -> RecvTransfer:
        if max(spec.block_ids) >= self.cache.layout.num_blocks:
            raise ValueError("block id out of range")
        with self._lock:
            if self._closed:
                raise RuntimeError("receiver is closed")
            old = self._expected.get(spec.transfer_id)
            if old is not None and not old.state.terminal:
                raise ValueError(f"transfer {spec.transfer_id!r} is already expected")
            transfer = RecvTransfer(
                spec.transfer_id,
                spec.block_ids,
                self.cache.layout.num_layers,
                spec.timeout_s or self.config.timeout_s,
                release,
                stats=self.stats,
            )
            self._expected[spec.transfer_id] = transfer
        return transfer

    def close(self) -> None:
        with self._lock:
            self._closed = True
            transfers = list(self._expected.values())
        for transfer in transfers:
            transfer.control.fail(TransferAborted(f"{transfer.transfer_id}: receiver closed"))
        self._monitor.stop()

    def _claim(self, transfer_id: str, num_blocks: int) -> tuple[RecvTransfer | None, Reason]:
        with self._lock:
            closed, transfer = self._closed, self._expected.get(transfer_id)
        if closed:
            return None, Reason.CLOSING
        if transfer is None:
            return None, Reason.UNKNOWN_TRANSFER
        if num_blocks != len(transfer.block_ids):
            transfer.control.fail(TransferRejected(f"{transfer_id}: block count mismatch"))
            return None, Reason.BLOCK_COUNT
        if not transfer.control.start():
            return None, error_reason(transfer.error) if transfer.error else Reason.NOT_PENDING
        return transfer, Reason.OK

    def _cancel(self, transfer_id: str, reason: Reason) -> None:
        with self._lock:
            pending = self._expected.get(transfer_id)
        if pending is not None and pending.started_at is None:
            pending.control.fail(reason_error(reason, transfer_id, "sender"))

    def _tick(self, now: float) -> None:
        with self._lock:
            transfers = list(self._expected.values())
        for transfer in transfers:
            transfer.control.expire(now)


class FakeSender(KVSender):
    def __init__(
        self, cache: KVCache, model: str, network: FakeNetwork, config: TransferConfig | None
    ) -> None:
        self.cache = cache
        self.config = config or TransferConfig()
        self.handshake = handshake_for(cache, model)
        self.stats = TransferStats()
        self._network = network
        self._lock = threading.Lock()
        self._queues: dict[PeerAddress, deque[SendTransfer]] = {}
        self._live: set[SendTransfer] = set()
        self._closed = False
        self._monitor = Monitor(self.config.poll_interval_s, self._tick, "fake-send-monitor")

    def send(self, spec: SendSpec, release: ReleaseFn) -> SendTransfer:
        if max(spec.block_ids) >= self.cache.layout.num_blocks:
            raise ValueError("block id out of range")
        with self._lock:
            if self._closed:
                raise RuntimeError("sender is closed")
            transfer = SendTransfer(
                spec.transfer_id,
                spec.block_ids,
                self.cache.layout.num_layers,
                spec.timeout_s or self.config.timeout_s,
                release,
                mode=spec.mode,
                stats=self.stats,
            )
            self._live.add(transfer)
            queue = self._queues.get(spec.peer)
            start = queue is None
            if queue is None:
                queue = self._queues[spec.peer] = deque()
            queue.append(transfer)
        if start:  # one worker per receiver, alive while its queue is non-empty
            threading.Thread(target=self._drain, args=(spec.peer,), daemon=True).start()
        return transfer

    def close(self) -> None:
        with self._lock:
            self._closed = True
            live = list(self._live)
        for transfer in live:
            transfer.control.fail(TransferAborted(f"{transfer.transfer_id}: sender closed"))
        self._monitor.stop()

    def _tick(self, now: float) -> None:
        with self._lock:
            live = list(self._live)
        for transfer in live:
            transfer.control.expire(now)

    def _drain(self, peer: PeerAddress) -> None:
        while True:
            with self._lock:
                queue = self._queues[peer]
                if not queue:
                    del self._queues[peer]
                    return
                transfer = queue.popleft()
            try:
                self._deliver(peer, transfer)
            finally:
                with self._lock:
                    self._live.discard(transfer)

    def _deliver(self, peer: PeerAddress, sent: SendTransfer) -> None:
        receiver, fault = self._network._lookup(peer)
        if not sent.control.start():
            if receiver is not None:  # like CANCEL: the receiver stops waiting
                receiver._cancel(sent.transfer_id, error_reason(sent.error))
            return
        if receiver is None:
            sent.control.fail(PeerLost(f"cannot reach receiver {peer}"))
            return
        problem = self.handshake.mismatch(receiver.handshake, "sender", "receiver")
        if problem:
            sent.control.fail(IncompatiblePeer(f"receiver {peer} refused us: {problem}"))
            return
        landed, reason = receiver._claim(sent.transfer_id, len(sent.block_ids))
        if landed is None:
            sent.control.fail(reason_error(reason, sent.transfer_id, f"receiver {peer}"))
            return
        self._copy(receiver.cache, sent, landed, fault)

    def _copy(
        self,
        target: KVCache,
        sent: SendTransfer,
        landed: RecvTransfer,
        fault: _Fault | None,
    ) -> None:
        layout = self.cache.layout
        n = len(sent.block_ids)
        src_ids = block_index(sent.block_ids, self.cache.device)
        dst_ids = block_index(landed.block_ids, target.device)
        lbb = layer_block_bytes(layout)
        staging = Staging(self.cache.device, slots=1)
        poll = self.config.poll_interval_s
        for chunk in plan_chunks(n, layout.num_layers, lbb, sent.mode, self.config.chunk_bytes):
            if fault is not None and chunk.index >= fault[1]:
                sent.control.fail(fault[0])
                landed.control.fail(fault[0])
                return
            if self._network.chunk_delay_s:
                time.sleep(self._network.chunk_delay_s)
            frame = staging.frame(0, chunk.nbytes(lbb))
            while True:  # until the chunk's layers are ready, or either side is over
                if sent.mode is TransferMode.LAYERWISE:
                    remaining = max(sent.deadline - time.monotonic(), 0.0)
                    sent.control.wait_for_layers(chunk.layer_stop, min(remaining + 0.01, poll))
                with sent.control.touching_blocks() as sender_live:
                    ready = sender_live and sent.ready_layers >= chunk.layer_stop
                    if ready:
                        nbytes = pack(self.cache, src_ids, chunk, frame)
                if ready:
                    break
                sent.control.expire(time.monotonic())
                if _propagate(sent, landed, "sender") or _propagate(landed, sent, "receiver"):
                    return
            with landed.control.touching_blocks() as receiver_live:
                if receiver_live:
                    unpack(target, dst_ids, chunk, frame)
            if not receiver_live:
                _propagate(landed, sent, "receiver")
                return
            sent.control.add_progress(nbytes, chunk.layers_complete(n))
            landed.control.add_progress(nbytes, chunk.layers_complete(n))
        landed.control.succeed()
        sent.control.succeed()


def _propagate(ended: Transfer, other: Transfer, side: str) -> bool:
    """Fail ``other`` because ``ended`` (the ``side`` peer) failed; True if ``ended`` is over."""
    if not ended.state.terminal:
        return False
    other.control.fail(reason_error(error_reason(ended.error), other.transfer_id, side))
    return True
