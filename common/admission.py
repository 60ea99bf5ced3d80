"""The admission queue's policy, pure: who is admitted next, and who is refused.

Overload control on every process that queues requests (the router, per pool; each
prefill and decode worker) is the same two-part thing: this policy, and the mechanism in
:mod:`common.admission_gate` that awaits a free slot. Rules, in order:

1. **Bounded.** At most ``max_queued`` requests wait. A request that arrives to a full
   queue is refused at once — unless it outranks the lowest priority waiting, in which
   case the *newest* of those lowest-priority requests is displaced (and refused) instead.
2. **Priority.** Higher ``priority`` is admitted first (0 = normal, 1 = high; any int).
3. **Fair.** Within a priority class, callers (``client_id``; "" is one anonymous caller)
   take turns round robin: one heavy caller with a thousand queued requests delays a light
   caller's one request by at most one admission per other caller.
4. **FIFO** within one caller of one class.

No clocks, no asyncio: unit-tested as is.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


class QueueFull(Exception):
    """The queue is full and the request does not outrank anyone in it."""


@dataclass(frozen=True, slots=True)
class Entry(Generic[T]):
    item: T
    priority: int
    client_id: str
    seq: int  # arrival order


class AdmissionQueue(Generic[T]):
    """Bounded queue of ``T`` (hashable, unique while queued); see the module docstring."""

    def __init__(self, max_queued: int) -> None:
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {max_queued}")
        self.max_queued = max_queued
        # priority → client id → that client's entries, FIFO; clients in turn order
        self._classes: dict[int, OrderedDict[str, deque[Entry[T]]]] = {}
        self._entries: dict[T, Entry[T]] = {}
        self._arrivals = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, item: object) -> bool:
        return item in self._entries

    def depth_by_priority(self) -> dict[int, int]:
        return {p: sum(len(q) for q in clients.values()) for p, clients in self._classes.items()}

    def push(self, item: T, priority: int = 0, client_id: str = "") -> T | None:
        """Queue ``item``; returns the item it displaced (the caller refuses it), or None.
        Raises QueueFull when there is no room and nobody of lower priority waits."""
        if item in self._entries:
            raise ValueError(f"{item!r} is queued already")
        displaced = None
        if len(self._entries) >= self.max_queued:
            lowest = min(self._classes, default=None)
            if lowest is None or lowest >= priority:
                raise QueueFull
            displaced = self._newest_of(lowest)
            self.remove(displaced)
        self._arrivals += 1
        entry = Entry(item, priority, client_id, self._arrivals)
        clients = self._classes.setdefault(priority, OrderedDict())
        clients.setdefault(client_id, deque()).append(entry)
        self._entries[item] = entry
        return displaced

    def pop(self) -> T | None:
        """The next item to admit (highest class; its next caller in turn), or None."""
        if not self._classes:
            return None
        priority = max(self._classes)
        clients = self._classes[priority]
        client_id, entries = next(iter(clients.items()))
        entry = entries.popleft()
        if entries:
            clients.move_to_end(client_id)  # its turn is over: to the back of the line
        else:
            del clients[client_id]
        if not clients:
            del self._classes[priority]
        del self._entries[entry.item]
        return entry.item

    def remove(self, item: T) -> bool:
        """Take ``item`` out (it gave up waiting); False if it was not queued."""
        entry = self._entries.pop(item, None)
        if entry is None:
            return False
        clients = self._classes[entry.priority]
        entries = clients[entry.client_id]
        entries.remove(entry)
        if not entries:
            del clients[entry.client_id]
        if not clients:
            del self._classes[entry.priority]
        return True

    def _newest_of(self, priority: int) -> T:
        """The most recent arrival of class ``priority`` (the one displaced first)."""
        return max((q[-1] for q in self._classes[priority].values()), key=lambda e: e.seq).item
