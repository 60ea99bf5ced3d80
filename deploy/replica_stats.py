"""What each worker replica tells `pdserve status` beyond the registry's load reports.

The registry (:mod:`common.registry`) carries what routers need: addresses and load.
Operators also want the replica behind each worker, its recent TTFT / ITL / queue-time
p90 and its prefix hit rate; each worker replica publishes a :class:`ReplicaStats` under
its own key every ``interval_s``, with a TTL, so a stopped replica disappears by itself::

    {ns}:deploy:replica:{worker_id}   STRING  ReplicaStats JSON, PX = ttl

:class:`StatsPublisher` runs on the replica's (Serve's) event loop; :func:`read_all` is
the blocking reader for the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import redis

from common.redis_client import open_async

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    worker_id: str
    deployment: str  # Serve deployment name, e.g. "PrefillWorker"
    replica_id: str  # Serve's replica id
    role: str
    pool: str
    grpc_address: str
    pid: int
    kv_block_use: float  # fraction of KV blocks referenced
    prefix_hit_rate: float | None  # prompt tokens served from the prefix cache; None = n/a
    ttft_p90_ms: float | None  # recent window; None = no samples
    itl_p90_ms: float | None
    updated_at: float = field(default_factory=time.time)
    queue_time_p90_ms: float | None = None  # admission-queue wait; None = no samples

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ReplicaStats:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def key(namespace: str, worker_id: str) -> str:
    return f"{namespace}:deploy:replica:{worker_id}"


class StatsPublisher:
    """Publishes ``stats_fn()`` every ``interval_s`` until :meth:`stop` (which deletes it)."""

    def __init__(
        self,
        redis_url: str,
        namespace: str,
        worker_id: str,
        stats_fn: Callable[[], ReplicaStats | None],
        interval_s: float = 1.0,
        password_file: str | None = None,
    ) -> None:
        self._redis = open_async(
            redis_url,
            password_file=password_file,
            decode_responses=True,
            socket_connect_timeout=2.0,
        )
        self._key = key(namespace, worker_id)
        self._stats_fn = stats_fn
        self._interval_s = interval_s
        self._ttl_ms = round(max(3.0, 3 * interval_s) * 1000)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"stats-{self._key}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(redis.RedisError, OSError):
            await self._redis.delete(self._key)
        await self._redis.aclose()

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                stats = self._stats_fn()
                if stats is not None:
                    await self._redis.set(self._key, stats.to_json(), px=self._ttl_ms)
                failing = False
            except Exception as exc:  # status is best effort; never take the replica down
                if not failing:
                    log.warning("publishing replica stats failed: %s", exc)
                failing = True
            await asyncio.sleep(self._interval_s)


def read_all(client: redis.Redis, namespace: str) -> dict[str, ReplicaStats]:
    """worker id → its latest stats, for every live worker replica."""
    keys = sorted(client.scan_iter(match=key(namespace, "*"), count=1000))
    stats: dict[str, ReplicaStats] = {}
    for raw in client.mget(keys) if keys else []:
        if raw is None:
            continue
        try:
            s = ReplicaStats.from_json(raw)
        except (ValueError, TypeError) as exc:
            log.warning("skipping malformed replica stats: %s", exc)
            continue
        stats[s.worker_id] = s
    return stats
