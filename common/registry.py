"""The worker registry and KV event streams, in Redis.

Workers register, heartbeat, publish their load and their prefix-cache events here; routers
(several, side by side) read the same state. Liveness is Redis key expiry: a worker that
stops heartbeating disappears after ``heartbeat_ttl_s`` with no cleanup from anyone.

Key scheme (``{ns}`` is the namespace, default ``pdserve``)::

    {ns}:workers             SET    ids of workers that registered. An index only: it may
                                    hold dead ids, which readers prune when they find the
                                    worker key gone (heartbeats re-add, so pruning races heal).
    {ns}:worker:{worker_id}  STRING WorkerInfo JSON, PX = heartbeat TTL. Exists == alive.
    {ns}:load:{worker_id}    STRING WorkerLoad JSON, PX = heartbeat TTL.
    {ns}:kv:{pool}           STREAM KV events of every worker in the pool, XADD with
                                    MAXLEN ~ kv_stream_maxlen (approximate trimming).
                                    Entries: common.kv_stream.

One stream per pool, not per worker: a router follows a pool with one XREAD and never has
to discover new streams, and each worker's events keep their order because a worker
belongs to one pool. Routers read with plain XREAD and their own last ids, never consumer
groups, which would hand each event to only one router.

Worker lifecycle: ``register`` (info + index + a ``clear`` marker, since a freshly started
worker's cache is empty) → ``heartbeat`` every ``interval_s`` (refresh TTL, publish load) →
``deregister`` (delete keys + ``clear`` marker) or death (keys expire).
:class:`worker.heartbeat.Heartbeat` runs that loop for a worker. Streams are trimmed, so a
router that falls further behind than ``kv_stream_maxlen`` entries, or starts late, has an
incomplete prefix index: that costs cache hits, never correctness, because workers check
their own caches.

With a cluster secret, registrations and KV stream entries are signed on write and
checked on read (:mod:`common.registry_signing`): a writer without the secret can neither
get a fake worker routed to nor skew prefix routing. Redis itself is opened by
:mod:`common.redis_client` (password, TLS).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from common.cluster_secret import ClusterSecret
from common.kv_events import AllBlocksCleared, StreamEvent
from common.kv_stream import clear_entry, decode_entry, encode_entry
from common.redis_client import open_async, open_sync
from common.registry_signing import RegistrySigning, UnsignedRegistration
from common.worker_info import WorkerInfo, WorkerLoad, WorkerRole

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVEventRecord:
    """One KV stream entry as a router sees it."""

    stream_id: str  # Redis entry id, "<ms>-<seq>"; the reader's cursor after this entry
    pool: str
    worker_id: str
    event: StreamEvent


class Registry:
    """Async client for workers (write side) and routers (read side). One per process."""

    def __init__(
        self,
        redis_url: str,
        namespace: str = "pdserve",
        heartbeat_ttl_s: float = 3.0,
        kv_stream_maxlen: int = 100_000,
        *,
        password_file: str | Path | None = None,
        secret: ClusterSecret | None = None,
    ) -> None:
        if heartbeat_ttl_s <= 0:
            raise ValueError(f"heartbeat_ttl_s must be positive, got {heartbeat_ttl_s}")
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self._ttl_ms = max(1, round(heartbeat_ttl_s * 1000))
        self._keys = _Keys(namespace)
        self._maxlen = kv_stream_maxlen
        # A connect timeout so an unreachable Redis fails a heartbeat instead of hanging it;
        # no read timeout, because XREAD legitimately blocks.
        self._redis = open_async(
            redis_url,
            password_file=password_file,
            decode_responses=True,
            socket_connect_timeout=2.0,
        )
        self._signing = RegistrySigning(secret)
        # raw registration → its decoded, verified WorkerInfo, for the last list_workers():
        # registrations never change while they live, so a refresh parses only new ones.
        self._decoded: dict[str, WorkerInfo] = {}
        self._pools: dict[str, str] = {}  # worker id → pool, for workers registered here

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> Registry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- worker side -------------------------------------------------------------------

    async def register(self, info: WorkerInfo, *, clear_kv: bool = True) -> None:
        """Announce a worker. ``clear_kv`` tells routers to forget its blocks first."""
        self._pools[info.worker_id] = info.pool
        k = self._keys
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(k.worker(info.worker_id), self._signing.encode(info), px=self._ttl_ms)
            pipe.sadd(k.index, info.worker_id)
            if clear_kv:
                entry = self._signing.entry(clear_entry(info.worker_id))
                pipe.xadd(k.kv(info.pool), entry, **self._trim)
            await pipe.execute()

    async def heartbeat(self, worker_id: str, load: WorkerLoad | None = None) -> bool:
        """Refresh the TTL (and publish ``load``) in one round trip.

        Returns False when the registration had already expired (Redis restarted, or the
        worker stalled past the TTL): the caller must ``register`` again.
        """
        if load is not None and load.worker_id != worker_id:
            raise ValueError(f"load of {load.worker_id!r} in heartbeat of {worker_id!r}")
        k = self._keys
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.pexpire(k.worker(worker_id), self._ttl_ms)
            pipe.sadd(k.index, worker_id)
            if load is not None:
                pipe.set(k.load(load.worker_id), load.to_json(), px=self._ttl_ms)
            alive, *_ = await pipe.execute()
        return bool(alive)

    async def publish_load(self, load: WorkerLoad) -> None:
        await self._redis.set(self._keys.load(load.worker_id), load.to_json(), px=self._ttl_ms)

    async def deregister(self, worker_id: str) -> None:
        """Remove a worker now (instead of after its TTL) and clear its blocks in routers."""
        k = self._keys
        pool = self._pools.pop(worker_id, None)
        if pool is None:  # deregistering a worker registered by another process
            raw = await self._redis.get(k.worker(worker_id))
            pool = WorkerInfo.from_json(raw).pool if raw is not None else None
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(k.worker(worker_id), k.load(worker_id))
            pipe.srem(k.index, worker_id)
            if pool is not None:
                pipe.xadd(k.kv(pool), self._signing.entry(clear_entry(worker_id)), **self._trim)
            await pipe.execute()

    async def publish_kv_events(
        self, worker_id: str, events: Sequence[StreamEvent], *, pool: str | None = None
    ) -> list[str]:
        """Append events, in order, to the pool's stream; returns their entry ids.

        ``pool`` defaults to the one this worker registered with through this client.
        """
        if not events:
            return []
        stream = self._keys.kv(self._pool_of(worker_id, pool))
        async with self._redis.pipeline(transaction=False) as pipe:
            for event in events:
                entry = self._signing.entry(encode_entry(worker_id, event))
                pipe.xadd(stream, entry, **self._trim)
            return list(await pipe.execute())

    async def publish_kv_clear(self, worker_id: str, *, pool: str | None = None) -> str:
        """Tell routers to drop all of this worker's blocks (e.g. its cache was reset)."""
        (entry_id,) = await self.publish_kv_events(worker_id, [AllBlocksCleared()], pool=pool)
        return entry_id

    # ---- router side -------------------------------------------------------------------

    async def list_workers(
        self, pool: str | None = None, role: WorkerRole | str | None = None
    ) -> list[WorkerInfo]:
        """Live workers, sorted by id, optionally of one pool and/or role."""
        ids = sorted(await self._redis.smembers(self._keys.index))
        raws = await self._redis.mget([self._keys.worker(i) for i in ids]) if ids else []
        infos, dead = _parse_infos(ids, raws, self._signing, self._decoded)
        if dead:
            await self._redis.srem(self._keys.index, *dead)
        return _filter(infos, pool, role)

    async def loads(self, worker_ids: Iterable[str] | None = None) -> dict[str, WorkerLoad]:
        """Latest load of each live worker (of ``worker_ids`` if given)."""
        ids = sorted(
            await self._redis.smembers(self._keys.index) if worker_ids is None else worker_ids
        )
        raws = await self._redis.mget([self._keys.load(i) for i in ids]) if ids else []
        return _parse_loads(raws)

    async def read_kv_events(
        self, last_ids: dict[str, str], block_ms: int | None = None, count: int = 1000
    ) -> list[KVEventRecord]:
        """Events after ``last_ids`` (pool → entry id), advancing ``last_ids`` in place.

        Start a cursor at ``"0"`` to replay the retained history or at ``"$"`` for only
        new events; ``"$"`` is resolved to the stream's current last id on the first call
        so nothing published between two calls is missed. ``block_ms=None`` returns at
        once; otherwise XREAD blocks up to that long for the first event (0 = forever).
        """
        for pool, last in last_ids.items():
            if last == "$":
                newest = await self._redis.xrevrange(self._keys.kv(pool), count=1)
                last_ids[pool] = newest[0][0] if newest else "0-0"
        if not last_ids:
            return []
        streams = {self._keys.kv(pool): last for pool, last in last_ids.items()}
        reply = await self._redis.xread(streams, count=count, block=block_ms)
        records: list[KVEventRecord] = []
        for key, entries in reply.items() if isinstance(reply, dict) else reply or []:
            pool = self._keys.pool_of_stream(key)
            for entry_id, fields in entries:
                last_ids[pool] = entry_id
                if not self._signing.entry_ok(fields):
                    continue
                decoded = decode_entry(fields)
                if decoded is not None:
                    records.append(KVEventRecord(entry_id, pool, *decoded))
        return records

    # ---- internals ---------------------------------------------------------------------

    @property
    def _trim(self) -> dict[str, Any]:
        return {"maxlen": self._maxlen, "approximate": True}

    def _pool_of(self, worker_id: str, pool: str | None) -> str:
        if pool is not None:
            return pool
        if worker_id not in self._pools:
            raise ValueError(f"worker {worker_id!r} was not registered here; pass pool=")
        return self._pools[worker_id]


class SyncRegistryReader:
    """Blocking read-only view for CLIs and tests: same keys and parsing as :class:`Registry`."""

    def __init__(
        self,
        redis_url: str,
        namespace: str = "pdserve",
        *,
        password_file: str | Path | None = None,
        secret: ClusterSecret | None = None,
    ) -> None:
        self._keys = _Keys(namespace)
        self._redis: redis.Redis = open_sync(
            redis_url, password_file=password_file, decode_responses=True
        )
        self._signing = RegistrySigning(secret)

    def close(self) -> None:
        self._redis.close()

    def list_workers(
        self, pool: str | None = None, role: WorkerRole | str | None = None
    ) -> list[WorkerInfo]:
        ids = sorted(self._redis.smembers(self._keys.index))
        raws = self._redis.mget([self._keys.worker(i) for i in ids]) if ids else []
        return _filter(_parse_infos(ids, raws, self._signing)[0], pool, role)

    def loads(self) -> dict[str, WorkerLoad]:
        ids = sorted(self._redis.smembers(self._keys.index))
        return _parse_loads(self._redis.mget([self._keys.load(i) for i in ids]) if ids else [])


# ---- encoding: dataclasses ↔ Redis values ----------------------------------------------


class _Keys:
    def __init__(self, namespace: str) -> None:
        self.ns = namespace
        self.index = f"{namespace}:workers"

    def worker(self, worker_id: str) -> str:
        return f"{self.ns}:worker:{worker_id}"

    def load(self, worker_id: str) -> str:
        return f"{self.ns}:load:{worker_id}"

    def kv(self, pool: str) -> str:
        return f"{self.ns}:kv:{pool}"

    def pool_of_stream(self, key: str) -> str:
        return key.removeprefix(f"{self.ns}:kv:")


def _parse_infos(
    ids: list[str],
    raws: list[str | None],
    signing: RegistrySigning,
    decoded: dict[str, WorkerInfo] | None = None,
) -> tuple[list[WorkerInfo], list[str]]:
    """(live infos, ids whose key has expired). Malformed or unsigned entries are logged
    and skipped. ``decoded`` (raw → info of the previous call) is reused and replaced by
    this call's, so it never outgrows the live registrations."""
    infos: list[WorkerInfo] = []
    dead: list[str] = []
    previous = dict(decoded) if decoded is not None else {}
    if decoded is not None:
        decoded.clear()
    for worker_id, raw in zip(ids, raws, strict=True):
        if raw is None:
            dead.append(worker_id)
            continue
        try:
            info = previous.get(raw) or signing.decode(raw)
            infos.append(info)
            if decoded is not None:
                decoded[raw] = info
        except UnsignedRegistration as exc:
            if signing.first_refusal(worker_id):
                log.warning("ignoring worker %s: %s (no cluster secret?)", worker_id, exc)
        except ValueError as exc:
            log.warning("skipping malformed registration of %s: %s", worker_id, exc)
    return infos, dead


def _parse_loads(raws: list[str | None]) -> dict[str, WorkerLoad]:
    loads: dict[str, WorkerLoad] = {}
    for raw in raws:
        if raw is None:
            continue
        try:
            load = WorkerLoad.from_json(raw)
        except ValueError as exc:
            log.warning("skipping malformed load report: %s", exc)
            continue
        loads[load.worker_id] = load
    return loads


def _filter(
    infos: list[WorkerInfo], pool: str | None, role: WorkerRole | str | None
) -> list[WorkerInfo]:
    wanted_role = WorkerRole(role) if role is not None else None
    return [
        i
        for i in infos
        if (pool is None or i.pool == pool) and (wanted_role is None or i.role == wanted_role)
    ]
