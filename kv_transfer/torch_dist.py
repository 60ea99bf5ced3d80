"""Shared machinery of the torch.distributed transport: the pair link and the monitor.

The roles live in :mod:`kv_transfer.sender` / :mod:`kv_transfer.send_pair` (prefill side)
and :mod:`kv_transfer.receiver` / :mod:`kv_transfer.recv_pair` /
:mod:`kv_transfer.expected` (decode side); rendezvous in :mod:`kv_transfer.rendezvous`;
the frames they exchange in :mod:`kv_transfer.wire`.

Threads of an endpoint: one per pair (all blocking send/recv of that pair happen there, in
order — which is what orders transfers per pair), one monitor (deadlines and, on the
sender, the receiver's abort flags), and on the receiver one acceptor (joins).

Why failures tear the pair down: a gloo wait that times out poisons the whole context
("Application timeout caused pair closure"), and neither ``abort()`` nor ``shutdown()``
wakes a local waiter. So every wait has a bound (the transfer's deadline plus
``grace_s``; ``idle_timeout_s`` between transfers), and the first error or timeout drops
the group. Dropping it closes its sockets, which fails the peer's pending ops at once; the
sender joins again for its next transfer, the receiver simply forgets the pair.
Aborts, on the other hand, travel as frames (see :mod:`kv_transfer.wire`) and keep the
pair alive.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.kv_cache import KVCache
from kv_transfer.control import TransferControl
from kv_transfer.errors import PeerLost, TransferError, TransferTimeout
from kv_transfer.packing import Staging, layer_block_bytes
from kv_transfer.rendezvous import backend_for, destroy_group
from kv_transfer.transfer import Transfer
from kv_transfer.types import Handshake, TransferConfig

log = logging.getLogger(__name__)


def handshake_for(cache: KVCache, model: str) -> Handshake:
    layout = cache.layout
    return Handshake(
        model=model,
        dtype=layout.dtype,
        block_size=layout.block_size,
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        order=layout.order,
        backend=backend_for(cache.device),
    )


def classify(exc: BaseException, what: str) -> TransferError:
    """Map a c10d/gloo/NCCL exception to the transfer failure it means."""
    if isinstance(exc, TransferError):
        return exc
    lines = str(exc).strip().splitlines()
    text = lines[0][:300] if lines else type(exc).__name__
    if not isinstance(exc, RuntimeError):  # not from the comm layer: a bug, say so
        return TransferError(f"{what}: {type(exc).__name__}: {text}")
    if "timed out" in text.lower() or "timeout" in text.lower():
        return TransferTimeout(f"{what}: {text}")
    return PeerLost(f"{what}: {text}")


def wire_timeout(transfer: Transfer, grace_s: float) -> float:
    """How long the wire may still block for ``transfer``: its deadline (or the moment it
    failed, if earlier) plus the grace the frames get to drain."""
    end = transfer.deadline
    if transfer.ended_at is not None:
        end = min(end, transfer.ended_at)
    return max(end + grace_s - time.monotonic(), 0.001)


class Link:
    """One side of a connected pair: the 2-rank group and framed, bounded send/recv."""

    def __init__(self, group: dist.ProcessGroup, rank: int, pair: int, peer: str) -> None:
        self.group: dist.ProcessGroup | None = group
        self.rank = rank
        self.peer_rank = 1 - rank
        self.pair = pair
        self.peer = peer  # for messages

    def isend(self, frame: torch.Tensor, tag: int) -> dist.Work:
        try:  # posting fails too, once gloo has seen the connection drop
            return self._group().send([frame], self.peer_rank, tag)
        except RuntimeError as exc:
            raise classify(exc, f"send to {self.peer}") from exc

    def irecv(self, frame: torch.Tensor, tag: int) -> dist.Work:
        try:
            return self._group().recv([frame], self.peer_rank, tag)
        except RuntimeError as exc:
            raise classify(exc, f"recv from {self.peer}") from exc

    def wait(self, work: dist.Work, timeout_s: float, what: str) -> None:
        """Wait for one op; any failure means the link is unusable (the caller drops it)."""
        try:
            completed = work.wait(timedelta(seconds=max(timeout_s, 0.001)))
        except RuntimeError as exc:
            raise classify(exc, f"{what} with {self.peer}") from exc
        if completed is False:
            raise PeerLost(f"{what} with {self.peer}: operation aborted")

    def close(self) -> None:
        group, self.group = self.group, None
        destroy_group(group)

    def _group(self) -> dist.ProcessGroup:
        if self.group is None:
            raise PeerLost(f"pair with {self.peer} is closed")
        return self.group


@dataclass(frozen=True, slots=True)
class PairContext:
    """One side of a connected pair, as the loop of one of its transfers sees it: the link,
    the cache whose blocks it reads or writes, the pair's staging frames, and the
    endpoint's config. The pair builds it when it connects; only the link changes after a
    teardown, the rest lives as long as the pair."""

    link: Link
    cache: KVCache
    staging: Staging
    config: TransferConfig
    layer_block_bytes: int = field(init=False)  # one layer's K (or V) of one block

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_block_bytes", layer_block_bytes(self.cache.layout))

    @property
    def depth(self) -> int:
        """Frames this side keeps in flight (``pipeline_depth``)."""
        return self.config.pipeline_depth

    def wire_timeout(self, transfer: Transfer) -> float:
        """How long the wire may still block for ``transfer`` (:func:`wire_timeout`)."""
        return wire_timeout(transfer, self.config.grace_s)


class FrameOps:
    """The wire operations of one frame, and the lease on the transfer's blocks they hold
    when some of them read or write the blocks in place (direct pieces).

    The lease ends only once every operation is through: completed, or its pair closed.
    gloo closes the pair when a wait fails or times out (under the pair's lock, which its IO
    thread holds while it reads or writes a buffer), so after that nothing touches the
    buffers again; NCCL's communicator is aborted by ``Link.close``.
    """

    ABANDON_WAIT_S = 0.001  # error path: a pending op ends here, closing the pair

    def __init__(self, leased: TransferControl | None) -> None:
        self.leased = leased  # the transfer whose lease this holds (``lease()`` was True)
        self.works: list[dist.Work] = []

    def finish(self, link: Link, timeout_s: float, what: str) -> None:
        """Wait until every operation is through, then end the lease; on a failure abandon
        the rest (which closes the link) and re-raise.

        Only the last one is waited for: a frame's operations share one pair and tag, which
        carry messages one after the other in posting order (one socket for gloo, one
        stream for NCCL), so its completion covers the others — and each wait that blocks
        costs a thread wake-up, which on a busy 2-core box is worth more than a message."""
        if self.works:
            try:
                link.wait(self.works[-1], timeout_s, what)
            except BaseException:
                self.works.pop()  # a gloo op must not be waited for twice
                self.abandon(link)
                raise
        self.works.clear()
        self._end()

    def abandon(self, link: Link) -> None:
        """Error path: end whatever is still pending — a wait that times out closes the
        pair, so the rest fail at once — close the link, then end the lease."""
        for work in self.works:
            with contextlib.suppress(TransferError):
                link.wait(work, self.ABANDON_WAIT_S, "abandoning")
        self.works.clear()
        link.close()
        self._end()

    def _end(self) -> None:
        leased, self.leased = self.leased, None
        if leased is not None:
            leased.return_lease()


class Monitor:
    """Calls ``tick(now)`` every ``interval_s`` on a daemon thread until stopped."""

    def __init__(self, interval_s: float, tick: Callable[[float], None], name: str) -> None:
        self._interval_s = interval_s
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._tick(time.monotonic())
            except Exception:  # a monitor that dies silently would strand every deadline
                log.exception("kv transfer monitor tick failed")
