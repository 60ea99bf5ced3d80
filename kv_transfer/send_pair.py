"""The sender's half of one (sender, receiver) pair: a FIFO of transfers and its thread.

A transfer's life here, per receiver pair (one thread each, FIFO — so transfers to one
receiver are ordered):

    queued → connecting (join on first use or after a teardown)
           → BEGIN (with our runs) / ACCEPT (with the receiver's): both sides know the plan
           → streaming (frame by frame: header + staged payload, then the direct pieces
             straight from the cache; layer-wise waits for each layer to be marked ready)
           → RESULT → done | failed

Packing a frame overlaps sending the previous ones (``pipeline_depth`` frames in flight).
Failure handling:

* ``abort()`` / deadline / ``close()`` make the transfer terminal at once; its ``release``
  runs once the direct pieces already on the wire have been read (at most the frames in
  flight; ``abort()`` returns after that). The pair thread notices at the next frame and
  sends ABORT frames, so the receiver fails its side too and the pair stays usable.
* The receiver's abort or timeout reaches us as a store flag that the monitor polls.
* A broken or timed-out connection fails the transfer in flight and drops the pair; the
  next transfer joins again (a restarted receiver is just a new join). A pair that fails
  before ACCEPT on a reused link is retried once on a fresh one: the receiver may have
  dropped an idle pair, and nothing of this transfer was accepted yet.

The group itself is budgeted (:mod:`kv_transfer.budget`): built only once the budget
admits it, torn down by this thread when the budget evicts it (LRU idle), when it has
been idle for ``idle_timeout_s``, or when the receiver flagged ``close/{k}`` in its store
(it dropped its side — which an NCCL peer would otherwise only notice at a deadline).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque

import torch.distributed as dist

from common.cluster_secret import load_secret
from engine.kv_cache import KVCache
from kv_transfer.budget import PairBudget
from kv_transfer.completion import Completion, PairStream, run_on
from kv_transfer.errors import (
    PeerLost,
    ProtocolError,
    TransferAborted,
    TransferError,
    TransferTimeout,
)
from kv_transfer.packing import Staging, run_in_inference_mode
from kv_transfer.rendezvous import connect_store, new_pair_group, request_join
from kv_transfer.segments import Frame, long_runs, plan_frames, run_min_blocks
from kv_transfer.streaming import Streaming
from kv_transfer.torch_dist import Link, PairContext, classify, link_options
from kv_transfer.transfer import SendTransfer
from kv_transfer.types import Handshake, PeerAddress, TransferConfig
from kv_transfer.wire import (
    CTRL_RUNS,
    MODE_CODES,
    TAG_CTRL,
    Header,
    Kind,
    Reason,
    error_reason,
    read_runs,
    reason_error,
    transfer_key,
    write_runs,
)

log = logging.getLogger(__name__)

CLOSE_CHECK_S = 0.5  # how often an idle pair looks for the receiver's close flag


class SenderPair:
    """The sender's half of one pair: a FIFO of transfers and the thread that runs them."""

    def __init__(
        self,
        address: PeerAddress,
        cache: KVCache,
        handshake: Handshake,
        config: TransferConfig,
        name: str,
        budget: PairBudget | None = None,
    ) -> None:
        self.address = address
        self._budget = budget if budget is not None else PairBudget(config.max_pair_groups)
        self._teardown_reason: str | None = None  # set by the budget / monitor; pair thread acts
        self._index = 0  # the connected pair's index at the receiver (its close flag)
        self._idle_since = time.monotonic()
        self._flag_checked = 0.0
        self._cache = cache
        self._handshake = handshake
        self._config = config
        self._secret = load_secret(config.cluster_secret_file)  # proves us at each join
        self._name = name
        self._staging = Staging(cache.device, slots=config.pipeline_depth)
        self._cuda_stream = PairStream(cache.device) if cache.device.type == "cuda" else None
        self._peer_depth = 2  # the receiver's, from its last ACCEPT
        self._cond = threading.Condition()
        self._queue: deque[SendTransfer] = deque()
        self._current: SendTransfer | None = None
        self._accepted = False  # the receiver accepted _current: its abort flag may appear
        self._closing = False
        self._pair: PairContext | None = None  # while connected
        self._rendezvous: dist.TCPStore | None = None  # the group's store client
        self._flags: dist.TCPStore | None = None  # monitor-only client (abort flags)
        self._seq = 0
        self._thread = threading.Thread(
            target=run_in_inference_mode,
            args=(functools.partial(run_on, self._cuda_stream, self._run),),
            name=f"kv-send-{address}",
            daemon=True,
        )
        self._thread.start()

    # ---- called from other threads -----------------------------------------------------

    def submit(self, transfer: SendTransfer) -> None:
        with self._cond:
            self._queue.append(transfer)
            self._cond.notify_all()

    def tick(self, now: float) -> None:
        with self._cond:
            live = [*self._queue, *([self._current] if self._current else [])]
            polled = self._current if self._accepted else None
            flags = self._flags
        for transfer in live:
            transfer.control.expire(now)
        self._check_idle(now, flags)
        if polled is None or flags is None or polled.state.terminal:
            return
        flag = f"abort/{transfer_key(polled.transfer_id)}"
        try:
            if flags.check([flag]):
                code = int(flags.get(flag))
                polled.control.fail(
                    reason_error(code, polled.transfer_id, f"receiver {self.address}")
                )
        except RuntimeError as exc:
            # The receiver hosts the store: losing it means losing the receiver. Without
            # this a layer-wise send that waits for the prefill would only notice at its
            # deadline, because no gloo op is pending on its side.
            polled.control.fail(
                PeerLost(f"{polled.transfer_id}: receiver {self.address} gone: {exc}")
            )

    def evict(self, reason: str = "evicted") -> None:
        """Ask the pair thread to tear the group down once it is idle (budget, TTL)."""
        with self._cond:
            self._teardown_reason = self._teardown_reason or reason
            self._cond.notify_all()

    def _check_idle(self, now: float, flags: dist.TCPStore | None) -> None:
        """Monitor: an idle group past ``idle_timeout_s``, or one the receiver dropped
        (its ``close/{k}`` flag, checked every ``CLOSE_CHECK_S``), is torn down."""
        with self._cond:
            if self._pair is None or self._current is not None or self._queue:
                return
            idle_for, index = now - self._idle_since, self._index
            check = flags is not None and now - self._flag_checked >= CLOSE_CHECK_S
            if check:
                self._flag_checked = now
        if idle_for > self._config.idle_timeout_s:
            self.evict("idle")
        elif check and flags is not None:
            try:
                closed = flags.check([f"close/{index}"])
            except RuntimeError:
                closed = True  # the receiver's store is gone
            if closed:
                self.evict("peer_closed")

    def close(self) -> None:
        with self._cond:
            self._closing = True
            doomed = [*self._queue, *([self._current] if self._current else [])]
            self._cond.notify_all()
        for transfer in doomed:
            transfer.control.fail(TransferAborted(f"{transfer.transfer_id}: sender closed"))
        self._thread.join(timeout=self._config.grace_s + 1)

    # ---- pair thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closing and not self._teardown_reason:
                        self._cond.wait()
                    reason, self._teardown_reason = self._teardown_reason, None
                    transfer = self._queue.popleft() if self._queue else None
                    self._current = transfer
                if reason is not None:
                    self._teardown(reason)
                if transfer is None:
                    if reason is None:
                        return  # closing
                    continue
                if self._pair is not None:
                    self._budget.busy(self.address)
                try:
                    if transfer.control.start():
                        self._transfer(transfer)
                    else:
                        self._cancel(transfer)
                except Exception as exc:  # a bug must not strand the transfer or the pair
                    log.exception("send of %s crashed", transfer.transfer_id)
                    transfer.control.fail(classify(exc, "send"))
                    self._teardown()
                finally:
                    with self._cond:
                        self._current, self._accepted = None, False
                        self._idle_since = time.monotonic()
                    self._budget.idle(self.address)
        finally:
            self._teardown("closed")

    def _transfer(self, transfer: SendTransfer) -> None:
        for attempt in range(2):
            reused = self._pair is not None
            try:
                pair = self._connect(transfer)
                plan = self._begin(pair, transfer)
            except PeerLost as exc:
                self._teardown()
                if attempt == 0 and reused and not transfer.state.terminal:
                    log.info("stale pair to %s (%s); joining again", self.address, exc)
                    continue
                transfer.control.fail(exc)
                return
            except TransferError as exc:
                self._teardown()
                transfer.control.fail(exc)
                return
            break
        if plan is None:
            return
        with self._cond:
            self._accepted = True
        try:
            self._stream(pair, transfer, plan)
        except TransferError as exc:
            self._teardown()
            transfer.control.fail(exc)

    def _connect(self, transfer: SendTransfer) -> PairContext:
        if self._pair is not None:
            if not self._receiver_dropped(self._pair):
                return self._pair
            self._teardown("peer_closed")
        cfg = self._config
        if not self._budget.acquire(self.address, self.evict, transfer.deadline):
            raise TransferTimeout(
                f"{transfer.transfer_id}: no pair group free for receiver {self.address} "
                f"before the deadline (max_pair_groups={cfg.max_pair_groups}, all busy)"
            )
        started = time.monotonic()
        try:
            pair, rendezvous, flags, index = self._join(transfer)
        except BaseException:
            self._budget.release(self.address, "setup_failed")
            raise
        self._budget.stats.setup(time.monotonic() - started)
        self._pair, self._rendezvous, self._seq = pair, rendezvous, 0
        with self._cond:
            self._flags, self._index = flags, index
            self._flag_checked = self._idle_since = time.monotonic()
        return pair

    def _receiver_dropped(self, pair: PairContext) -> bool:
        """NCCL only: did the receiver flag ``close/{k}``? A BEGIN into a communicator the
        receiver aborted would only fail at the deadline; on gloo its closed sockets fail
        the BEGIN at once (then one silent re-join), so gloo skips the store round trip."""
        if pair.link.completion is not Completion.POLLED or self._flags is None:
            return False
        try:
            return bool(self._flags.check([f"close/{self._index}"]))
        except RuntimeError:
            return True

    def _join(
        self, transfer: SendTransfer
    ) -> tuple[PairContext, dist.TCPStore, dist.TCPStore, int]:
        """Rendezvous, join handshake and group: the pair, its stores and its index."""
        cfg = self._config
        remaining = max(transfer.deadline - time.monotonic(), 0.05)
        timeout = min(cfg.connect_timeout_s, remaining)
        rendezvous = connect_store(self.address, timeout)
        index = request_join(
            rendezvous, self._name, self._handshake, self.address, timeout, self._secret
        )
        device = self._cache.device
        try:
            group = new_pair_group(
                rendezvous, index, 1, device, cfg.host, timeout, cfg.group_timeout_s
            )
        except RuntimeError as exc:
            raise classify(exc, f"group with receiver {self.address}") from exc
        flags = connect_store(self.address, timeout)
        link = Link(group, 1, index, f"receiver {self.address}", **link_options(device, cfg))
        pair = PairContext(link, self._cache, self._staging, cfg, self._cuda_stream)
        return pair, rendezvous, flags, index

    def _begin(self, pair: PairContext, transfer: SendTransfer) -> tuple[Frame, ...] | None:
        """BEGIN → ACCEPT | REJECT, each listing its side's runs; the frame plan, or None
        (and the transfer failed) on REJECT."""
        self._seq += 1
        link, staging, cfg, layout = pair.link, pair.staging, pair.config, pair.cache.layout
        n = len(transfer.block_ids)
        min_blocks = run_min_blocks(
            cfg.direct_min_bytes,
            pair.layer_block_bytes,
            layout.num_layers,
            transfer.mode,
            layout.page_first,
        )
        src_runs = long_runs(transfer.block_ids, min_blocks, CTRL_RUNS)
        reply = link.irecv(staging.rx_control, TAG_CTRL)  # posted first: R never waits on us
        Header(
            Kind.BEGIN,
            transfer_key(transfer.transfer_id),
            self._seq,
            num_blocks=n,
            code=MODE_CODES[transfer.mode],
            value=cfg.chunk_bytes,
            runs=len(src_runs),
            direct=cfg.direct_min_bytes,
        ).write(staging.tx_control)
        write_runs(staging.tx_control, src_runs)
        begin = link.isend(staging.tx_control, TAG_CTRL)
        link.wait(reply, pair.wire_timeout(transfer), "ACCEPT")
        link.wait(begin, pair.wire_timeout(transfer), "BEGIN")  # delivered, if answered
        header = self._expect(transfer, (Kind.ACCEPT, Kind.REJECT))
        if header.kind is Kind.REJECT:
            transfer.control.fail(reason_error(header.code, transfer.transfer_id, link.peer))
            return None
        self._peer_depth = max(1, header.value)
        dst_runs = read_runs(staging.rx_control, header.runs, n)
        return plan_frames(
            n,
            layout.num_layers,
            pair.layer_block_bytes,
            transfer.mode,
            cfg.chunk_bytes,
            cfg.direct_min_bytes,
            src_runs,
            dst_runs,
            page_first=layout.page_first,
        )

    def _stream(self, pair: PairContext, transfer: SendTransfer, plan: tuple[Frame, ...]) -> None:
        link = pair.link
        result = link.irecv(pair.staging.rx_control, TAG_CTRL)
        Streaming(pair, transfer, plan, self._seq, self._peer_depth).run()
        link.wait(result, pair.wire_timeout(transfer), "RESULT")
        header = self._expect(transfer, (Kind.RESULT,))
        if header.code == Reason.OK:
            transfer.control.succeed()
        else:
            transfer.control.fail(reason_error(header.code, transfer.transfer_id, link.peer))

    def _expect(self, transfer: SendTransfer, kinds: tuple[Kind, ...]) -> Header:
        header = Header.read(self._staging.rx_control)
        key = transfer_key(transfer.transfer_id)
        if header.kind not in kinds or header.key != key or header.seq != self._seq:
            raise ProtocolError(
                f"{transfer.transfer_id}: expected {[k.name for k in kinds]} for seq "
                f"{self._seq}, got {header.kind.name} seq {header.seq}"
            )
        return header

    def _cancel(self, transfer: SendTransfer) -> None:
        """Tell the receiver to stop waiting for a transfer that never started here."""
        if self._pair is None:
            return
        link = self._pair.link
        key = transfer_key(transfer.transfer_id)
        Header(Kind.CANCEL, key, self._seq, code=error_reason(transfer.error)).write(
            self._staging.tx_control
        )
        try:
            work = link.isend(self._staging.tx_control, TAG_CTRL)
            link.wait(work, self._config.grace_s, "CANCEL")
        except TransferError:
            self._teardown()

    def _teardown(self, reason: str = "error") -> None:
        pair, self._pair, self._rendezvous = self._pair, None, None
        with self._cond:
            self._flags = None
        if pair is not None:
            pair.link.close()
            self._budget.release(self.address, reason)
