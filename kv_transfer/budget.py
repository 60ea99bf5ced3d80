"""A budget of pair groups per process: at most ``cap`` open, idle ones evicted LRU first.

Each pair group costs resources for as long as it is open — an NCCL communicator about
100 MB of GPU memory — so an endpoint asks the budget before it builds one
(:meth:`PairBudget.acquire`) and tells it when the group goes (:meth:`PairBudget.release`).
At the cap the least recently used *idle* group is asked to go (its ``evict`` callback,
which only flags the pair: the pair's own thread tears it down, since only it touches the
link); a group with a transfer in flight (:meth:`PairBudget.busy`) is never chosen. The
budget is policy and bookkeeping only: it holds no group and never blocks in a backend.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from kv_transfer.metrics import GroupStats

EvictFn = Callable[[], None]


@dataclass(slots=True)
class _Entry:
    evict: EvictFn
    last_used: float
    busy: bool = False
    evicting: bool = False


class PairBudget:
    """Thread-safe cap on open pair groups (``cap`` 0 = unbounded)."""

    def __init__(
        self,
        cap: int,
        stats: GroupStats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cap = cap
        self.stats = stats or GroupStats()
        self._clock = clock
        self._cond = threading.Condition()
        self._open: dict[Hashable, _Entry] = {}

    def acquire(self, key: Hashable, evict: EvictFn, deadline: float, *, wait: bool = True) -> bool:
        """Admit a new group for ``key``; True once admitted.

        At the cap the LRU idle group is evicted first. With ``wait`` this blocks until the
        evicted group has gone (or one becomes idle), up to ``deadline``; without it the
        group is admitted as soon as a victim was chosen — the cap is then exceeded by one
        for the milliseconds the victim takes to go — and refused when every group is busy.
        """
        while True:
            with self._cond:
                if key in self._open:
                    return True
                if self._has_room():
                    self._admit(key, evict)
                    return True
                victim = self._victim()
                if victim is None and not wait:
                    return False
                if victim is not None:
                    victim.evicting = True
                    if not wait:
                        self._admit(key, evict)
            if victim is not None:
                victim.evict()  # outside the lock: it may call back into the budget
                if not wait:
                    return True
                continue
            with self._cond:
                if self._has_room() or self._victim() is not None:
                    continue
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))

    def busy(self, key: Hashable) -> None:
        """A transfer is in flight on ``key``'s group: it is never evicted until idle."""
        with self._cond:
            entry = self._open.get(key)
            if entry is not None:
                entry.busy, entry.last_used = True, self._clock()

    def idle(self, key: Hashable) -> None:
        with self._cond:
            entry = self._open.get(key)
            if entry is not None:
                entry.busy, entry.last_used = False, self._clock()
            self._cond.notify_all()

    def release(self, key: Hashable, reason: str) -> None:
        """``key``'s group is gone (``reason`` labels the teardown metric)."""
        with self._cond:
            if self._open.pop(key, None) is None:
                return
            self.stats.teardown(reason, len(self._open))
            self._cond.notify_all()

    def holders(self) -> tuple[Hashable, ...]:
        """Keys that hold an open group, most recently used last."""
        with self._cond:
            return tuple(k for k, _ in sorted(self._open.items(), key=lambda i: i[1].last_used))

    def __len__(self) -> int:
        with self._cond:
            return len(self._open)

    def _has_room(self) -> bool:
        return self.cap == 0 or len(self._open) < self.cap

    def _admit(self, key: Hashable, evict: EvictFn) -> None:
        self._open[key] = _Entry(evict, self._clock(), busy=True)  # built for a transfer
        self.stats.set_open(len(self._open))

    def _victim(self) -> _Entry | None:
        """The LRU idle group — unless one is on its way out already (one at a time)."""
        if any(e.evicting for e in self._open.values()):
            return None
        idle = [e for e in self._open.values() if not e.busy]
        return min(idle, key=lambda e: e.last_used) if idle else None
