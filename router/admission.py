"""The router's per-pool admission queues: overload control before any routing.

Lifecycle of a request here (:meth:`RouterAdmission.admitted`, after validation and
tokenization, before the first routing decision)::

    queued     the pool has ``max_in_flight`` requests streaming: wait, higher ``priority``
               first, callers (``client_id``) round robin within a priority
               (:mod:`common.admission`); a full queue (``max_queued``) refuses at once
               with RESOURCE_EXHAUSTED and a retry-after hint (:mod:`common.admission_gate`)
    in flight  holds the pool's slot until its stream ends, however it ends

The same priority and client id travel on to the workers, whose own admission queues
order their work the same way (:mod:`worker.admission`). Measured per pool: queue depth,
queue time, and refusals by reason (``queue_full``, ``displaced``, ``deadline``;
``workers_full`` when every worker of the pool refused for now, ``too_large`` when for
good).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable

from common.admission_gate import AdmissionGate, Refused, Slot
from router.config import PoolConfig
from router.metrics import RouterMetrics

WORKERS_FULL = "workers_full"  # every worker of the pool refused (their queues were full)
TOO_LARGE = "too_large"  # every worker refused for good: the prompt can never fit


class RouterAdmission:
    def __init__(self, pools: Iterable[PoolConfig], metrics: RouterMetrics) -> None:
        self._gates = {
            p.name: AdmissionGate(
                f"pool {p.name!r}", p.max_in_flight, p.max_queued, p.max_queue_wait_s
            )
            for p in pools
        }
        self._metrics = metrics

    def gate(self, pool: str) -> AdmissionGate:
        return self._gates[pool]

    @contextlib.asynccontextmanager
    async def admitted(
        self, pool: str, priority: int, client_id: str, deadline: float | None
    ) -> AsyncIterator[Slot]:
        """Hold one of ``pool``'s slots for the body; raises :class:`Refused`."""
        gate = self._gates[pool]
        depth = self._metrics.admission_depth.labels(pool)
        depth.inc()
        try:
            slot = await gate.acquire(priority, client_id, deadline)
        except Refused as exc:
            self.refused(pool, exc.reason)
            raise
        finally:
            depth.dec()
        self._metrics.admission_seconds.labels(pool).observe(slot.waited_s)
        try:
            yield slot
        finally:
            slot.release()

    def refused(self, pool: str, reason: str) -> None:
        self._metrics.rejections.labels(pool, reason).inc()
