"""A worker's admission queue: the gate every Prefill / Decode call passes first.

Lifecycle (both roles)::

    accepted   the call arrived and passed its checks
      → queued     waits for one of ``max_active_requests`` slots, higher priority first,
                   callers (``client_id``) round robin within a priority; a full queue
                   (``admission_queue_size``) refuses at once: RESOURCE_EXHAUSTED with a
                   retry-after hint (the router then tries another worker of the pool)
      → started    holds its slot until the call ends (decode: prealloc → running;
                   prefill: compute → KV send), however it ends

Measured: the queue's depth (gauge), each request's accept → start time (histogram, and
the p90 of the recent window that load reports carry as ``queue_time_ms_recent``), and
refusals by reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from common.admission_gate import AdmissionGate, Refused, Slot
from common.metrics import Metrics
from worker.latency import LatencyWindow

QUEUE_TIME_QUANTILE = 0.9


class WorkerAdmission:
    def __init__(self, name: str, max_active: int, max_queued: int, metrics: Metrics) -> None:
        self.gate = AdmissionGate(name, max_active, max_queued)
        self.queue_time_window = LatencyWindow()
        self._depth = metrics.gauge("admission_queue_depth", "Requests waiting for admission")
        self._queue_seconds = metrics.histogram(
            "admission_queue_seconds", "Time from acceptance to start of work"
        )
        self._rejections = metrics.counter(
            "admission_rejections", "Requests refused by the admission queue", ["reason"]
        )

    @property
    def limit(self) -> int:
        """Requests accepted at once before a refusal, active + queued (``admission_limit``)."""
        return self.gate.max_active + self.gate.max_queued

    @property
    def queued(self) -> int:
        return self.gate.queued

    def queue_time_ms(self) -> float | None:
        return self.queue_time_window.percentile_ms(QUEUE_TIME_QUANTILE)

    @contextlib.asynccontextmanager
    async def admitted(
        self, priority: int, client_id: str, deadline: float | None
    ) -> AsyncIterator[Slot]:
        """Hold a slot for the body; raises :class:`Refused` when refused or too late."""
        self._depth.inc()
        try:
            slot = await self.gate.acquire(priority, client_id, deadline)
        except Refused as exc:
            self._rejections.labels(exc.reason).inc()
            raise
        finally:
            self._depth.dec()
        self._queue_seconds.observe(slot.waited_s)
        self.queue_time_window.add(slot.waited_s)
        try:
            yield slot
        finally:
            slot.release()
