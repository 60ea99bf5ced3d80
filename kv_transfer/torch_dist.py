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
``grace_s``; ``idle_timeout_s`` between transfers; never more than the group's timeout
allows, :class:`~kv_transfer.completion.WaitBudget`), completion is observed on a host
deadline on both backends (:mod:`kv_transfer.completion`: NCCL's ``wait`` does not block
the host), and the first error or timeout drops the group (NCCL: aborts it). Dropping it
closes its sockets, which fails the peer's pending ops at once; the
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
from typing import Any

import torch
import torch.distributed as dist

from engine.kv_cache import KVCache
from kv_transfer.completion import ABANDON_S, Completion, PairStream, WaitBudget, poll_work
from kv_transfer.control import TransferControl
from kv_transfer.errors import PeerLost, TransferError, TransferTimeout
from kv_transfer.packing import Staging, layer_block_bytes
from kv_transfer.rendezvous import abort_nccl, backend_for, destroy_group
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
    """One side of a connected pair: the 2-rank group and framed, bounded send/recv.

    Every wait keeps a host-side deadline, clamped to ``budget.max_wait_s`` (below the
    group's timeout, so NCCL's watchdog never fires under a live wait), and observes
    completion the way the backend allows (:mod:`kv_transfer.completion`). A wait that
    reaches its deadline *expires* the operation — gloo: a 1 ms wait closes gloo's pair;
    NCCL: the communicator is aborted — and raises :class:`TransferTimeout`; the caller
    then drops the link, the same on both backends."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        rank: int,
        pair: int,
        peer: str,
        *,
        completion: Completion = Completion.BLOCKING,
        budget: WaitBudget | None = None,
    ) -> None:
        self.group: dist.ProcessGroup | None = group
        self.rank = rank
        self.peer_rank = 1 - rank
        self.pair = pair
        self.peer = peer  # for messages
        self.completion = completion
        self.budget = budget or WaitBudget.for_group(TransferConfig().group_timeout_s)

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
        if not self.poll(work, timeout_s, what):
            self.expire()
            raise TransferTimeout(f"{what} with {self.peer}: timed out after {timeout_s:.3g}s")

    def poll(
        self,
        work: dist.Work,
        timeout_s: float,
        what: str,
        *,
        idle: bool = False,
        stop: Callable[[], bool] | None = None,
    ) -> bool:
        """True once ``work`` is through, False when the (clamped) deadline passed or
        ``stop()`` said so first (polled links only) — the op is then still pending, and
        the caller must :meth:`expire` it (a timed-out gloo wait has closed gloo's pair
        already). Raises the op's own error, classified."""
        budget = self.budget
        deadline = budget.deadline(timeout_s, time.monotonic())
        try:
            if self.completion is Completion.BLOCKING:
                try:
                    completed = work.wait(timedelta(seconds=max(deadline - time.monotonic(), 1e-3)))
                except RuntimeError as exc:
                    if not _is_timeout(exc):
                        raise
                    return False  # gloo closed its pair: the buffer is touched no more
            else:
                sleep_cap = budget.idle_sleep_s if idle else budget.max_sleep_s
                if not poll_work(work, deadline, sleep_cap, stop=stop):
                    return False
                completed = work.wait()  # the op's error; orders the current stream after it
        except RuntimeError as exc:
            raise classify(exc, f"{what} with {self.peer}") from exc
        if completed is False:
            raise PeerLost(f"{what} with {self.peer}: operation aborted")
        return True

    def expire(self) -> None:
        """After :meth:`poll` gave up on an op: make sure its buffer is touched no more.
        gloo closed its pair inside the timed-out wait already; an NCCL op can only be
        ended by aborting the communicator, so the link closes."""
        if self.completion is Completion.POLLED:
            self.close()

    def close(self) -> None:
        group, self.group = self.group, None
        if self.completion is Completion.POLLED and group is not None:
            abort_nccl(group)  # also a fake NCCL group in the unit tests
            return
        destroy_group(group)

    def _group(self) -> dist.ProcessGroup:
        if self.group is None:
            raise PeerLost(f"pair with {self.peer} is closed")
        return self.group


def link_options(device: torch.device, config: TransferConfig) -> dict[str, Any]:
    """A link's completion mode and wait budget for a cache on ``device``."""
    polled = backend_for(device) == "nccl"
    return {
        "completion": Completion.POLLED if polled else Completion.BLOCKING,
        "budget": WaitBudget.for_group(config.group_timeout_s),
    }


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


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
    stream: PairStream | None = None  # the pair's CUDA stream (None on CPU)
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

    def after_compute(self, event: object | None) -> None:
        """CUDA: order the pair's stream after the compute that wrote what it reads next."""
        if self.stream is not None:
            self.stream.after(event)  # type: ignore[arg-type]

    def sync(self, transfer: Transfer, what: str) -> None:
        """CUDA: wait (polled, against the wire deadline) until everything queued on the
        pair's stream ran — the landed KV is then visible to any stream. No-op on CPU."""
        work = self.stream.landed() if self.stream is not None else None
        if work is None:
            return
        deadline = time.monotonic() + min(self.wire_timeout(transfer), self.link.budget.max_wait_s)
        if not poll_work(work, deadline, self.link.budget.max_sleep_s):
            self.link.close()
            raise TransferTimeout(f"{what} with {self.link.peer}: stream not done in time")


class FrameOps:
    """The wire operations of one frame, and the lease on the transfer's blocks they hold
    when some of them read or write the blocks in place (direct pieces).

    The lease ends only once every operation is through: completed, or its pair closed.
    gloo closes the pair when a wait fails or times out (under the pair's lock, which its IO
    thread holds while it reads or writes a buffer), so after that nothing touches the
    buffers again; NCCL's communicator is aborted by ``Link.close``.
    """

    ABANDON_WAIT_S = ABANDON_S  # error path: a pending op ends here, closing the pair

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
                if link.group is not None:
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
