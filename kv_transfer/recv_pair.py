"""The receiver's half of one (sender, receiver) pair: the thread that lands its frames.

Between transfers the thread waits for a BEGIN (or CANCEL) frame; it serves one transfer
at a time, in the order the sender sent them, into the blocks the caller reserved with
``expect``. A transfer's life here:

    expected (registered, waiting; fails by itself at its deadline)
      → claimed by a pair on BEGIN (with the sender's runs; checks: known id, still
        pending, same block count) → ACCEPT (with our runs): both sides know the plan
      → landing (frame by frame, in layer order, :class:`~kv_transfer.landing.Landing`;
        ``layers_landed`` grows)
      → done | failed  → RESULT tells the sender

Landing frame i overlaps receiving the next frames, whose receives are already posted.
Failure handling:

* ``abort()`` / deadline / ``close()`` make the transfer terminal at once; its ``release``
  runs as soon as the direct pieces already posted into its blocks have arrived (they are
  posted only for frames the sender has committed to). If it was already on the wire, an
  abort flag in the store tells the sender, who answers with ABORT frames; meanwhile the
  pair drains (receives into staging and scratch without landing), so no block is written
  after ``release`` and the pair stays usable.
* The sender's abort arrives as ABORT frames; its death as a broken connection, which
  fails the transfer in flight and ends the pair (a restarted sender joins anew).

Between transfers the pair keeps one receive posted for the next BEGIN, bounded like every
wait (:class:`~kv_transfer.torch_dist.Link`): after ``idle_timeout_s`` — or, on a polled
(NCCL) link, as soon as the budget evicts the pair — the pair ends, and ``close/{k}`` in
the store tells the sender to drop its side too (on gloo the closed sockets tell it as
well; an NCCL sender would otherwise hang on its next BEGIN until the deadline). The
sender joins again on its next transfer.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

from engine.kv_cache import KVCache
from kv_transfer.budget import PairBudget
from kv_transfer.completion import PairStream, run_on
from kv_transfer.errors import ProtocolError, TransferError
from kv_transfer.expected import ExpectedTransfers
from kv_transfer.landing import Landing
from kv_transfer.packing import Staging, run_in_inference_mode
from kv_transfer.rendezvous import connect_store, new_pair_group
from kv_transfer.segments import Segment, long_runs, plan_frames, run_min_blocks
from kv_transfer.torch_dist import Link, PairContext, classify, link_options
from kv_transfer.transfer import RecvTransfer
from kv_transfer.types import PeerAddress, TransferConfig, TransferState
from kv_transfer.wire import (
    CODE_MODES,
    CTRL_RUNS,
    TAG_CTRL,
    Header,
    Kind,
    Reason,
    error_reason,
    read_runs,
    reason_error,
    write_runs,
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
        budget: PairBudget | None = None,
        flags: dist.Store | None = None,
    ) -> None:
        self.index = index
        self._budget = budget if budget is not None else PairBudget(config.max_pair_groups)
        self._flags = flags  # the receiver's store: ``close/{k}`` tells the sender
        self._evicted: str | None = None
        self._cuda_stream = PairStream(cache.device) if cache.device.type == "cuda" else None
        self.peer = f"sender {peer_name}"
        self._cache = cache
        self._config = config
        self._address = address
        self._expected = expected
        self._on_exit = on_exit
        self._staging = Staging(cache.device, slots=config.pipeline_depth)
        self._thread = threading.Thread(
            target=run_in_inference_mode,
            args=(functools.partial(run_on, self._cuda_stream, self._run),),
            name=f"kv-recv-{index}",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def evict(self, reason: str = "evicted") -> None:
        """The budget wants this (idle) pair gone: flag it for the pair thread and the
        sender. Any thread; the pair thread closes the link."""
        self._evicted = self._evicted or reason
        self._flag_close()

    def _run(self) -> None:
        cfg, device = self._config, self._cache.device
        started = time.monotonic()
        try:
            rendezvous = connect_store(self._address, cfg.connect_timeout_s)
            group = new_pair_group(
                rendezvous, self.index, 0, device, cfg.host, cfg.connect_timeout_s,
                cfg.group_timeout_s,
            )  # fmt: skip
        except (TransferError, RuntimeError) as exc:
            log.warning("pair %d with %s never formed: %s", self.index, self.peer, exc)
            self._budget.release(self.index, "setup_failed")
            self._on_exit(self.index)
            return
        self._budget.stats.setup(time.monotonic() - started)
        self._budget.idle(self.index)
        link = Link(group, 0, self.index, self.peer, **link_options(device, cfg))
        pair = PairContext(link, self._cache, self._staging, cfg, self._cuda_stream)
        reason = "error"
        try:
            seq = 0
            while True:
                rx = self._staging.rx_control
                if not self._wait_begin(link, link.irecv(rx, TAG_CTRL)):
                    reason = self._evicted or "idle"
                    return
                header = Header.read(rx)
                if header.kind is Kind.CANCEL:
                    self._expected.cancel(header.key, header.code, self.peer)
                    continue
                if header.kind is not Kind.BEGIN or header.seq != seq + 1:
                    raise ProtocolError(f"expected BEGIN seq {seq + 1}, got {header}")
                seq = header.seq
                self._budget.busy(self.index)
                try:
                    if not self._serve(pair, header):
                        reason = "closed"
                        return
                finally:
                    self._budget.idle(self.index)
        except TransferError as exc:
            reason = self._evicted or "error"  # a gloo sender dropping an evicted pair
            log.info("pair %d with %s closed: %s", self.index, self.peer, exc)
        finally:
            link.close()
            self._flag_close()
            self._budget.release(self.index, reason)
            self._on_exit(self.index)

    def _wait_begin(self, link: Link, work: dist.Work) -> bool:
        """The posted receive for the next BEGIN; False when the pair should end first:
        idle for ``idle_timeout_s`` or (polled links) evicted. The op is then expired."""
        stop = lambda: self._evicted is not None  # noqa: E731
        if link.poll(work, self._config.idle_timeout_s, "waiting for BEGIN", idle=True, stop=stop):
            return True
        link.expire()
        return False

    def _flag_close(self) -> None:
        if self._flags is None:
            return
        try:
            self._flags.set(f"close/{self.index}", self._evicted or "closed")
        except RuntimeError:
            log.debug("cannot flag pair %d closed", self.index, exc_info=True)

    def _serve(self, pair: PairContext, begin: Header) -> bool:
        """One transfer; False when the pair should close (receiver shutting down)."""
        src_runs = read_runs(pair.staging.rx_control, begin.runs, begin.num_blocks)
        transfer, reason = self._expected.claim(begin)
        if transfer is None:
            self._reply(pair, Kind.REJECT, begin, reason, None)
            return reason is not Reason.CLOSING
        try:
            self._land(pair, begin, transfer, src_runs)
        except Exception as exc:  # whatever broke, the blocks go back and the pair closes
            error = classify(exc, f"landing {transfer.transfer_id}")
            transfer.control.fail(error)
            raise error from exc
        finally:
            self._expected.settle(begin.key)
        return True

    def _land(
        self,
        pair: PairContext,
        begin: Header,
        transfer: RecvTransfer,
        src_runs: tuple[Segment, ...],
    ) -> None:
        layout = self._cache.layout
        mode = CODE_MODES[begin.code]
        min_blocks = run_min_blocks(
            begin.direct, pair.layer_block_bytes, layout.num_layers, mode, layout.page_first
        )
        dst_runs = long_runs(transfer.block_ids, min_blocks, CTRL_RUNS)
        plan = plan_frames(
            len(transfer.block_ids),
            layout.num_layers,
            pair.layer_block_bytes,
            mode,
            begin.value,
            begin.direct,
            src_runs,
            dst_runs,
            page_first=layout.page_first,
        )
        landing = Landing(pair, transfer, begin, plan)
        try:
            # The first frames are posted before ACCEPT: the sender starts on it.
            landing.post_ahead()
            # Not waited for here: under CPU contention its completion can lag the first frame.
            accept = self._reply(
                pair, Kind.ACCEPT, begin, Reason.OK, transfer, wait=False, value=pair.depth,
                runs=dst_runs,
            )  # fmt: skip
        except BaseException:
            landing.abandon()  # its pieces hold leases on the blocks
            raise
        landing.run()
        if landing.sender_code is None:
            pair.sync(transfer, "landing")  # CUDA: the scatters on the pair's stream ran
        if landing.sender_code is not None:
            transfer.control.fail(
                reason_error(landing.sender_code, transfer.transfer_id, self.peer)
            )
        else:
            transfer.control.succeed()
        code = Reason.OK if transfer.state is TransferState.DONE else error_reason(transfer.error)
        pair.link.wait(accept, pair.wire_timeout(transfer), "ACCEPT")
        self._reply(pair, Kind.RESULT, begin, code, transfer)

    def _reply(
        self,
        pair: PairContext,
        kind: Kind,
        begin: Header,
        code: int,
        transfer: RecvTransfer | None,
        wait: bool = True,
        value: int = 0,
        runs: tuple[Segment, ...] = (),
    ) -> dist.Work:
        """Send a control frame; waits for it unless ``wait`` is False (then the caller
        must wait before ``tx_control`` is written again)."""
        tx = pair.staging.tx_control
        Header(kind, begin.key, begin.seq, code=int(code), value=value, runs=len(runs)).write(tx)
        write_runs(tx, runs)
        work = pair.link.isend(tx, TAG_CTRL)
        if wait:
            timeout = pair.wire_timeout(transfer) if transfer else pair.config.grace_s
            pair.link.wait(work, timeout, kind.name)
        return work
