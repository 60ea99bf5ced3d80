"""Live workers and their loads, per pool, refreshed from Redis in the background.

Lifecycle: ``start()`` reads the registry once (so the first request already sees the
workers), then a task re-reads it every ``interval_s`` and swaps in new immutable
:class:`~router.snapshot.PoolSnapshot` objects; ``snapshot(pool)`` is a dict lookup on
the request path. Several routers reading one Redis see the same workers.

Each snapshot also carries its workers sorted by load (:class:`~router.candidates.LoadOrder`),
so that a decision in a big pool scores a shortlist instead of every worker: the sorting
happens here, once per refresh, on the refresh's own schedule — its cost grows with the
fleet, never with the request rate (``benchmarks/router_overhead.py`` measures it at 2,000
workers). Draining workers (their load says so) are left out. If Redis stays unreachable for
``stale_after_s`` the snapshots empty out: routing to workers nobody can vouch for is worse
than UNAVAILABLE. ``on_refresh(live_ids)`` lets the owner forget state of departed workers.
With a cluster secret, registrations not signed with it never reach the view: the
registry client drops them (and logs each fake worker once; :mod:`common.registry_signing`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from common.registry import Registry
from common.worker_info import WorkerInfo, WorkerLoad, WorkerRole
from router.candidates import load_order
from router.snapshot import PoolSnapshot, WorkerView
from router.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class RegistryView:
    def __init__(
        self,
        registry: Registry,
        pools: Iterable[str],
        interval_s: float = 0.1,
        stale_after_s: float = 10.0,
        on_refresh: Callable[[frozenset[str]], None] | None = None,
    ) -> None:
        self._registry = registry
        self._pools = tuple(pools)
        self._interval_s = interval_s
        self._stale_after_s = stale_after_s
        self._on_refresh = on_refresh
        self._snapshots = {pool: PoolSnapshot(pool) for pool in self._pools}
        self._last_ok = time.monotonic()
        self._epoch = 0  # refreshes so far: reshuffles load ties (router.candidates)
        self._task: asyncio.Task[None] | None = None

    def snapshot(self, pool: str) -> PoolSnapshot:
        return self._snapshots[pool]

    async def start(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # serve anyway; requests get UNAVAILABLE until Redis is back
            log.warning("first registry read failed: %s", exc)
        self._task = asyncio.create_task(self._run(), name="registry-view")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def refresh(self) -> None:
        workers = await self._registry.list_workers()
        loads = await self._registry.loads([w.worker_id for w in workers]) if workers else {}
        now = time.monotonic()
        self._epoch += 1
        self._snapshots = {
            pool: _build(pool, workers, loads, now, self._epoch) for pool in self._pools
        }
        self._last_ok = now
        if self._on_refresh is not None:
            self._on_refresh(frozenset(w.worker_id for w in workers))

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.refresh()
                if failing:
                    log.info("registry reachable again")
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("registry refresh failed: %s", exc)
                failing = True
                if time.monotonic() - self._last_ok > self._stale_after_s:
                    self._snapshots = {pool: PoolSnapshot(pool) for pool in self._pools}


def _build(
    pool: str, workers: list[WorkerInfo], loads: dict[str, WorkerLoad], now: float, epoch: int
) -> PoolSnapshot:
    groups: dict[WorkerRole, list[WorkerView]] = {role: [] for role in WorkerRole}
    draining: list[str] = []
    for info in workers:  # sorted by id by the registry
        if info.pool != pool:
            continue
        view = WorkerView(info, loads.get(info.worker_id))
        if view.draining:
            draining.append(info.worker_id)
        else:
            groups[info.role].append(view)
    prefill, decode = groups[WorkerRole.PREFILL], groups[WorkerRole.DECODE]
    colocated = groups[WorkerRole.COLOCATED]
    return PoolSnapshot(
        pool=pool,
        prefill=tuple(prefill),
        decode=tuple(decode),
        colocated=tuple(colocated),
        taken_at=now,
        draining=tuple(draining),
        order=load_order(prefill, decode, colocated, epoch),
    )
