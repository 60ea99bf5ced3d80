"""The admission gate: a bounded number of requests *active*, a bounded queue before them.

Lifecycle of one request at a gate::

    acquire(priority, client_id, deadline)
      ├─ a slot is free and nobody waits   → active at once (waited 0)
      ├─ the queue has room (or it outranks someone queued, who is displaced)
      │                                    → queued; admitted in the order of
      │                                      :class:`common.admission.AdmissionQueue`
      ├─ its expected wait is over ``max_queue_wait_s`` (when set)
      │                                    → :class:`Refused` RESOURCE_EXHAUSTED at once
      └─ full                              → :class:`Refused` RESOURCE_EXHAUSTED at once,
                                             with ``retry_after_ms``
    (queued) deadline passes               → :class:`Refused` DEADLINE_EXCEEDED
    (queued) caller cancelled              → out of the queue, nothing held
    Slot.release()                         → the next queued request is admitted

Refusals do no work beyond this bookkeeping: they are answered in microseconds.

The retry-after hint is the queue's drain time estimate: (requests queued + 1) × the mean
time a request held its slot (an exponential moving average; 1 s before any sample) / the
number of slots, clamped to [50 ms, 60 s]. The same estimate, counting only the requests
queued at the arrival's priority or above, is its expected wait: with ``max_queue_wait_s``
set, an arrival expected to wait longer is refused instead of queued. A slot is held for a
whole stream, so a queue sized in requests alone lets admitted requests' TTFT grow by
whole generations; the wait budget keeps admitted TTFT near the unloaded one.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

from common.admission import AdmissionQueue, QueueFull
from common.errors import ErrorCode, RequestError

MIN_RETRY_AFTER_MS = 50
MAX_RETRY_AFTER_MS = 60_000
_INITIAL_HOLD_S = 1.0
_EMA_WEIGHT = 0.2  # of the newest sample

# Refusal reasons (the ``reason`` label of the rejection counters):
QUEUE_FULL = "queue_full"
DISPLACED = "displaced"  # pushed out of a full queue by a higher-priority arrival
DEADLINE = "deadline"  # the deadline passed while queued
QUEUE_WAIT = "queue_wait"  # its expected wait in the queue is over max_queue_wait_s


class Refused(RequestError):
    """A gate refused the request; ``reason`` is one of the constants above."""

    def __init__(
        self, code: ErrorCode, message: str, reason: str, retry_after_ms: int | None = None
    ) -> None:
        super().__init__(code, message, retry_after_ms)
        self.reason = reason


@dataclass(eq=False, slots=True)
class _Waiter:
    future: asyncio.Future[None]


@dataclass(eq=False, slots=True)
class Slot:
    """One admitted request's hold on the gate; release it exactly once (idempotent)."""

    gate: AdmissionGate
    waited_s: float  # time in the queue (0 when admitted at once)
    since: float = field(default_factory=time.monotonic)
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.gate._release(time.monotonic() - self.since)


class AdmissionGate:
    """``max_active`` requests at a time, ``max_queued`` more waiting (each expected to wait
    at most ``max_queue_wait_s``, when set); ``name`` for messages."""

    def __init__(
        self, name: str, max_active: int, max_queued: int, max_queue_wait_s: float | None = None
    ) -> None:
        if max_active < 1:
            raise ValueError(f"{name}: max_active must be >= 1, got {max_active}")
        if max_queue_wait_s is not None and not max_queue_wait_s > 0:
            raise ValueError(f"{name}: max_queue_wait_s must be > 0, got {max_queue_wait_s}")
        self.name = name
        self.max_queue_wait_s = max_queue_wait_s
        self.max_active = max_active
        self.active = 0
        self._queue: AdmissionQueue[_Waiter] = AdmissionQueue(max_queued)
        self._hold_s = _INITIAL_HOLD_S

    @property
    def max_queued(self) -> int:
        return self._queue.max_queued

    @property
    def queued(self) -> int:
        return len(self._queue)

    def retry_after_ms(self) -> int:
        """Estimated time until the queue has drained (see the module docstring)."""
        ms = 1000.0 * (len(self._queue) + 1) * self._hold_s / self.max_active
        return int(min(max(math.ceil(ms), MIN_RETRY_AFTER_MS), MAX_RETRY_AFTER_MS))

    def expected_wait_s(self, priority: int = 0) -> float:
        """How long an arrival of ``priority`` would wait in the queue (the hint's estimate,
        counting only the requests queued at its priority or above)."""
        ahead = sum(n for p, n in self._queue.depth_by_priority().items() if p >= priority)
        return (ahead + 1) * self._hold_s / self.max_active

    async def acquire(
        self, priority: int = 0, client_id: str = "", deadline: float | None = None
    ) -> Slot:
        """A slot, now or after waiting; ``deadline`` is ``time.monotonic()`` based.
        Raises :class:`Refused` (RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED)."""
        if self.active < self.max_active and not self._queue:
            self.active += 1
            return Slot(self, 0.0)
        budget = self.max_queue_wait_s
        if budget is not None and self.expected_wait_s(priority) > budget:
            raise self._full(f"its expected queue wait is over {budget:g} s", QUEUE_WAIT)
        queued_at = time.monotonic()
        waiter = _Waiter(asyncio.get_running_loop().create_future())
        try:
            displaced = self._queue.push(waiter, priority, client_id)
        except QueueFull:
            raise self._full("its admission queue is full", QUEUE_FULL) from None
        if displaced is not None:
            why = "displaced by a higher-priority request"
            displaced.future.set_exception(self._full(why, DISPLACED))
        try:
            async with asyncio.timeout(_remaining(deadline)):
                await waiter.future
        except BaseException as exc:
            self._leave(waiter)
            if isinstance(exc, TimeoutError):
                raise Refused(
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"deadline passed waiting in {self.name}'s admission queue",
                    DEADLINE,
                ) from None
            raise
        return Slot(self, time.monotonic() - queued_at)

    def _full(self, why: str, reason: str) -> Refused:
        hint = self.retry_after_ms()
        return Refused(
            ErrorCode.RESOURCE_EXHAUSTED,
            f"{self.name} is overloaded: {why} ({self.active} active, {len(self._queue)} "
            f"queued of {self.max_queued}); retry after {hint} ms",
            reason,
            hint,
        )

    def _leave(self, waiter: _Waiter) -> None:
        """A waiter gave up (cancelled, timed out, displaced): hold nothing for it."""
        if self._queue.remove(waiter):
            waiter.future.cancel()
            return
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            self._release(None)  # admitted just as it left: pass the slot on

    def _release(self, held_s: float | None) -> None:
        if held_s is not None:
            self._hold_s += _EMA_WEIGHT * (held_s - self._hold_s)
        self.active -= 1
        while self.active < self.max_active:
            waiter = self._queue.pop()
            if waiter is None:
                return
            if not waiter.future.done():
                waiter.future.set_result(None)
                self.active += 1


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)
