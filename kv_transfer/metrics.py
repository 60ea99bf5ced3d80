"""Per-transfer measurements and their running aggregate.

Every transfer produces one :class:`TransferMetrics` when it reaches a terminal state.
:class:`TransferStats` folds them into counters and a duration histogram whose layout
matches Prometheus (cumulative buckets, sum, count), so a worker exports a snapshot with
a few ``Counter``/``Histogram`` calls and no knowledge of the transport. Thread-safe: the
transport's threads record, the worker's metrics loop snapshots.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from kv_transfer.types import Role, TransferState

# Seconds. Spans a one-block transfer on loopback (~1 ms) to a multi-GiB one on a slow link.
DURATION_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


@dataclass(frozen=True, slots=True)
class TransferMetrics:
    """One finished transfer, as seen by one side."""

    transfer_id: str
    role: Role
    state: TransferState  # DONE or FAILED
    failure: str | None  # TransferError.kind when FAILED
    num_blocks: int
    bytes: int  # payload bytes this side moved (packed or landed)
    queued_s: float  # registration/submission until frames started to move
    duration_s: float  # frames started to move until terminal
    layers: int  # layer chunks sent/landed (== num_layers when complete)


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """Monotonic totals since the endpoint started, ready for Prometheus export."""

    transfers: dict[tuple[str, str], int]  # (role, "done" | failure kind) -> count
    bytes: dict[str, int]  # role -> payload bytes of DONE transfers
    duration_buckets: tuple[float, ...]
    duration_counts: dict[str, tuple[int, ...]]  # role -> cumulative count per bucket
    duration_sum: dict[str, float]  # role -> seconds, DONE transfers
    duration_count: dict[str, int]
    recent: tuple[TransferMetrics, ...]  # the last few transfers, newest last


@dataclass
class TransferStats:
    """Thread-safe aggregate of :class:`TransferMetrics`."""

    keep_recent: int = 256
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _transfers: dict[tuple[str, str], int] = field(default_factory=dict)
    _bytes: dict[str, int] = field(default_factory=dict)
    _buckets: dict[str, list[int]] = field(default_factory=dict)
    _sum: dict[str, float] = field(default_factory=dict)
    _count: dict[str, int] = field(default_factory=dict)
    _recent: deque[TransferMetrics] = field(default_factory=deque)

    def record(self, m: TransferMetrics) -> None:
        role = m.role.value
        outcome = "done" if m.state is TransferState.DONE else (m.failure or "error")
        with self._lock:
            self._transfers[(role, outcome)] = self._transfers.get((role, outcome), 0) + 1
            self._recent.append(m)
            while len(self._recent) > self.keep_recent:
                self._recent.popleft()
            if m.state is not TransferState.DONE:
                return
            # Only successful transfers feed bandwidth and latency: a timeout's "duration"
            # is the timeout, which would drown the signal.
            self._bytes[role] = self._bytes.get(role, 0) + m.bytes
            buckets = self._buckets.setdefault(role, [0] * len(DURATION_BUCKETS))
            for i, bound in enumerate(DURATION_BUCKETS):
                if m.duration_s <= bound:
                    buckets[i] += 1
            self._sum[role] = self._sum.get(role, 0.0) + m.duration_s
            self._count[role] = self._count.get(role, 0) + 1

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return StatsSnapshot(
                transfers=dict(self._transfers),
                bytes=dict(self._bytes),
                duration_buckets=DURATION_BUCKETS,
                duration_counts={r: tuple(c) for r, c in self._buckets.items()},
                duration_sum=dict(self._sum),
                duration_count=dict(self._count),
                recent=tuple(self._recent),
            )


# Seconds to build a pair group: ~1-3 ms for gloo on loopback, up to seconds for NCCL.
SETUP_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class GroupSnapshot:
    """Pair groups of one endpoint (or of a process sharing one budget)."""

    open: int  # gauge: groups open now
    setups: int  # groups built since start
    setup_buckets: tuple[float, ...]
    setup_counts: tuple[int, ...]  # cumulative count per bucket
    setup_sum: float  # seconds
    teardowns: dict[str, int]  # reason (evicted, idle, error, peer_closed, closed) -> count


class GroupSink(Protocol):
    """Where :class:`GroupStats` mirrors each event as it happens (e.g. Prometheus,
    :func:`kv_transfer.prometheus.prometheus_groups`)."""

    def opened(self, open_now: int) -> None: ...

    def set_up(self, seconds: float) -> None: ...

    def torn_down(self, reason: str, open_now: int) -> None: ...


@dataclass
class GroupStats:
    """Thread-safe counters of pair groups: open, setups (with a time histogram), teardowns."""

    sink: GroupSink | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _open: int = 0
    _setups: int = 0
    _buckets: list[int] = field(default_factory=lambda: [0] * len(SETUP_BUCKETS))
    _setup_sum: float = 0.0
    _teardowns: dict[str, int] = field(default_factory=dict)

    def set_open(self, n: int) -> None:
        with self._lock:
            self._open = n
        if self.sink is not None:
            self.sink.opened(n)

    def setup(self, seconds: float) -> None:
        with self._lock:
            self._setups += 1
            self._setup_sum += seconds
            for i, bound in enumerate(SETUP_BUCKETS):
                if seconds <= bound:
                    self._buckets[i] += 1
        if self.sink is not None:
            self.sink.set_up(seconds)

    def teardown(self, reason: str, open_now: int) -> None:
        with self._lock:
            self._teardowns[reason] = self._teardowns.get(reason, 0) + 1
            self._open = open_now
        if self.sink is not None:
            self.sink.torn_down(reason, open_now)

    def snapshot(self) -> GroupSnapshot:
        with self._lock:
            return GroupSnapshot(
                open=self._open,
                setups=self._setups,
                setup_buckets=SETUP_BUCKETS,
                setup_counts=tuple(self._buckets),
                setup_sum=self._setup_sum,
                teardowns=dict(self._teardowns),
            )
