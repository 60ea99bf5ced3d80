"""A worker's presence in the registry: register, beat, publish load, deregister.

:class:`Heartbeat` runs the worker side of the lifecycle that :mod:`common.registry`
describes, as an asyncio task next to the worker's gRPC server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import redis

from common.registry import Registry
from common.worker_info import WorkerInfo, WorkerLoad

log = logging.getLogger(__name__)


class Heartbeat:
    """Keeps one worker registered with fresh load until stopped.

    ``start()`` registers (with a ``clear`` marker) and starts a task that, every
    ``interval_s``, refreshes the TTL and publishes ``load_fn()``; ``stop()`` cancels it and
    deregisters. Redis errors are logged and retried on the next beat: a worker that cannot
    reach Redis drops out of routing by TTL, which is the right outcome. The event loop
    must stay responsive (run model steps off-loop) or the worker expires under load.
    """

    def __init__(
        self,
        registry: Registry,
        info: WorkerInfo,
        load_fn: Callable[[], WorkerLoad],
        interval_s: float = 0.25,
    ) -> None:
        if not 0 < interval_s < registry.heartbeat_ttl_s:
            raise ValueError(
                f"interval_s={interval_s} must be in (0, ttl={registry.heartbeat_ttl_s})"
            )
        self._registry = registry
        self._info = info
        self._load_fn = load_fn
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("Heartbeat already started")
        await self._registry.register(self._info)
        await self._registry.publish_load(self._load_fn())
        self._task = asyncio.create_task(self._run(), name=f"heartbeat-{self._info.worker_id}")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        try:
            await self._registry.deregister(self._info.worker_id)
        except (redis.RedisError, OSError) as exc:  # the TTL removes it anyway
            log.warning("deregister %s failed: %s", self._info.worker_id, exc)

    async def __aenter__(self) -> Heartbeat:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        worker_id = self._info.worker_id
        failing = False
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                if not await self._registry.heartbeat(worker_id, self._load_fn()):
                    # Expired while alive: the cache is intact, so keep routers' blocks.
                    log.warning("registration of %s had expired; re-registering", worker_id)
                    await self._registry.register(self._info, clear_kv=False)
                failing = False
            except Exception as exc:
                if not failing:  # log the first failure of a streak, not every beat
                    log.warning("heartbeat of %s failed: %s", worker_id, exc)
                failing = True
