"""The event loop: a heap of (time, sequence, callback, argument), run in time order.

Ties in time run in the order they were scheduled (the sequence number), so a run is a
pure function of its inputs and seed. Callbacks schedule further events; a component that
changes its mind (a decode run cut short by a join) bumps its own generation counter and
ignores the stale event when it fires, instead of searching the heap.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any


class EventLoop:
    """Discrete-event clock; ``now`` is the time of the event being run."""

    __slots__ = ("_heap", "_seq", "events", "now", "stopped")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = 0
        self.now = 0.0
        self.events = 0  # events run so far
        self.stopped = False  # stop() was called: run() returns after the current event

    def at(self, t: float, callback: Callable[[Any], None], arg: Any = None) -> None:
        """Run ``callback(arg)`` at time ``t`` (not before now)."""
        self._seq += 1
        heapq.heappush(self._heap, (t if t > self.now else self.now, self._seq, callback, arg))

    def stop(self) -> None:
        """End :meth:`run` after the event being run (the rest stay in the heap)."""
        self.stopped = True

    def clock(self) -> float:
        """The simulated time (a clock for the router's prefix index)."""
        return self.now

    def run(self, until: float = float("inf")) -> None:
        """Run events in order until none is left or the next is after ``until``."""
        heap, pop = self._heap, heapq.heappop
        while heap and heap[0][0] <= until:
            t, _, callback, arg = pop(heap)
            self.now = t
            self.events += 1
            callback(arg)
            if self.stopped:
                return

    def __len__(self) -> int:
        return len(self._heap)
