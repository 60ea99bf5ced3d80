"""Follows the pools' KV event streams in Redis and applies them to the prefix indexes.

Lifecycle: ``start()`` positions one cursor per pool at the start of the retained stream
(``"0"``: a router that starts late replays what the workers already cached), then a task
loops on a blocking XREAD over all pools and applies each event to its pool's
:class:`~router.index.PrefixIndex`. Redis errors are logged and retried; a gap (trimmed
stream, outage) costs cache hits, never correctness, because workers check their own caches.
Plain XREAD with our own cursors, not consumer groups: every router sees every event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from common.registry import Registry
from router.index import PrefixIndex
from router.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class KVEventFollower:
    def __init__(
        self,
        registry: Registry,
        indexes: Mapping[str, PrefixIndex],
        block_ms: int = 500,
        batch: int = 1000,
        retry_s: float = 0.5,
    ) -> None:
        self._registry = registry
        self._indexes = indexes
        self._block_ms = block_ms
        self._batch = batch
        self._retry_s = retry_s
        self._cursors = {pool: "0" for pool in indexes}
        self._task: asyncio.Task[None] | None = None
        self.applied = 0  # events applied so far (tests and metrics read it)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kv-event-follower")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def poll(self, block_ms: int | None = None) -> int:
        """Read and apply one batch of events; returns how many were applied."""
        records = await self._registry.read_kv_events(self._cursors, block_ms, self._batch)
        for record in records:
            index = self._indexes.get(record.pool)
            if index is not None:
                index.apply(record.worker_id, record.event)
        self.applied += len(records)
        return len(records)

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self.poll(self._block_ms)
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning("reading KV events failed: %s", exc)
                failing = True
                await asyncio.sleep(self._retry_s)
