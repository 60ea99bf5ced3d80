"""Registry against a real redis-server: registration, TTL liveness, load, KV streams.

Tests share one session server, so each uses its own namespace. pytest-asyncio is not a
dependency: each test runs its coroutine with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from common.hashing import ROOT_HASH
from common.kv_events import AllBlocksCleared, BlockEvicted, BlockStored
from common.registry import Registry, SyncRegistryReader
from common.worker_info import BlockGeometry, WorkerInfo, WorkerLoad, WorkerRole
from worker.heartbeat import Heartbeat

TTL_S = 0.5


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def make_info(worker_id: str, role: WorkerRole = WorkerRole.PREFILL, pool: str = "p") -> WorkerInfo:
    geometry = BlockGeometry("m", "float32", 16, 30, 3, 64, 128)
    return WorkerInfo(worker_id, role, pool, "m", "127.0.0.1:1", None, geometry, started_at=1.0)


def make_load(worker_id: str, running: int = 0) -> WorkerLoad:
    return WorkerLoad(worker_id, queued=0, running=running, free_blocks=10, used_blocks=0,
                      cached_blocks=0)  # fmt: skip


def test_register_list_filter_deregister(redis_url: str, namespace: str) -> None:
    async def scenario() -> None:
        async with Registry(redis_url, namespace, heartbeat_ttl_s=5) as reg:
            await reg.register(make_info("a", WorkerRole.PREFILL, "p1"))
            await reg.register(make_info("b", WorkerRole.DECODE, "p1"))
            await reg.register(make_info("c", WorkerRole.COLOCATED, "p2"))
            assert [w.worker_id for w in await reg.list_workers()] == ["a", "b", "c"]
            assert [w.worker_id for w in await reg.list_workers(pool="p1")] == ["a", "b"]
            assert [w.worker_id for w in await reg.list_workers(role="decode")] == ["b"]
            assert await reg.list_workers(pool="p2", role=WorkerRole.PREFILL) == []
            assert (await reg.list_workers(pool="p2"))[0] == make_info(
                "c", WorkerRole.COLOCATED, "p2"
            )

            await reg.deregister("b")
            assert [w.worker_id for w in await reg.list_workers()] == ["a", "c"]

    asyncio.run(scenario())
    # The sync view sees the same state.
    reader = SyncRegistryReader(redis_url, namespace)
    try:
        assert [w.worker_id for w in reader.list_workers()] == ["a", "c"]
    finally:
        reader.close()


def test_worker_disappears_after_ttl_unless_heartbeating(redis_url: str, namespace: str) -> None:
    async def scenario() -> None:
        async with Registry(redis_url, namespace, heartbeat_ttl_s=TTL_S) as reg:
            await reg.register(make_info("alive"))
            await reg.register(make_info("dead"))
            deadline = time.monotonic() + 1.5 * TTL_S
            while time.monotonic() < deadline:
                assert await reg.heartbeat("alive")
                await asyncio.sleep(TTL_S / 5)
            assert [w.worker_id for w in await reg.list_workers()] == ["alive"]
            # The expired one was pruned from the index and reports it must re-register.
            assert not await reg.heartbeat("dead")

    asyncio.run(scenario())


def test_load_publishing(redis_url: str, namespace: str) -> None:
    async def scenario() -> None:
        async with Registry(redis_url, namespace, heartbeat_ttl_s=TTL_S) as reg:
            await reg.register(make_info("a"))
            await reg.register(make_info("b"))
            await reg.publish_load(make_load("a", running=3))
            assert await reg.heartbeat("b", make_load("b", running=5))
            loads = await reg.loads()
            assert {k: v.running for k, v in loads.items()} == {"a": 3, "b": 5}
            assert loads["a"].free_blocks == 10 and not loads["a"].draining
            assert set(await reg.loads(["b"])) == {"b"}
            await asyncio.sleep(1.5 * TTL_S)  # stale loads expire with the worker
            assert await reg.loads() == {}

    asyncio.run(scenario())


def test_heartbeat_helper_keeps_worker_alive_then_deregisters(
    redis_url: str, namespace: str
) -> None:
    running = 0

    def current_load() -> WorkerLoad:
        return make_load("hb", running=running)

    async def scenario() -> None:
        nonlocal running
        async with Registry(redis_url, namespace, heartbeat_ttl_s=TTL_S) as reg:
            async with Heartbeat(reg, make_info("hb"), current_load, interval_s=0.05):
                running = 4
                await asyncio.sleep(2 * TTL_S)  # well past the TTL
                assert [w.worker_id for w in await reg.list_workers()] == ["hb"]
                assert (await reg.loads())["hb"].running == 4
            assert await reg.list_workers() == []
            assert await reg.loads() == {}
            # Registration and deregistration both told routers to drop its blocks.
            records = await reg.read_kv_events({"p": "0"})
            assert [r.event for r in records] == [AllBlocksCleared(), AllBlocksCleared()]

    asyncio.run(scenario())


def test_two_readers_see_all_events_in_order(redis_url: str, namespace: str) -> None:
    stored = [BlockStored(block_hash=2**64 - 1 - i, parent_hash=ROOT_HASH, block_id=i)
              for i in range(50)]  # fmt: skip
    evicted = [BlockEvicted(block_hash=2**64 - 1, block_id=0)]

    async def reader(reg: Registry, cursor: dict[str, str], expected: int) -> list:
        got: list = []
        while len(got) < expected:
            got += await reg.read_kv_events(cursor, block_ms=2000, count=7)
        return got

    async def scenario() -> None:
        async with (
            Registry(redis_url, namespace) as worker,
            Registry(redis_url, namespace) as router1,
            Registry(redis_url, namespace) as router2,
        ):
            await worker.register(make_info("w1", pool="p"), clear_kv=False)
            await worker.register(make_info("w2", pool="p"), clear_kv=False)
            total = len(stored) + len(evicted) + 1
            cursors = [{"p": "$"}, {"p": "$"}]
            for router, cursor in zip((router1, router2), cursors, strict=True):
                await router.read_kv_events(cursor)  # pins "$" to the current last id
            readers = [
                asyncio.create_task(reader(router, cursor, total))
                for router, cursor in zip((router1, router2), cursors, strict=True)
            ]
            await asyncio.sleep(0.05)  # let both readers block in XREAD before publishing
            await worker.publish_kv_events("w1", stored[:25])
            await worker.publish_kv_events("w2", stored[25:])
            await worker.publish_kv_events("w1", evicted)
            await worker.publish_kv_clear("w2")
            results = await asyncio.wait_for(asyncio.gather(*readers), timeout=10)

        expected = (
            [("w1", e) for e in stored[:25]]
            + [("w2", e) for e in stored[25:]]
            + [("w1", evicted[0]), ("w2", AllBlocksCleared())]
        )
        for got in results:
            assert [(r.worker_id, r.event) for r in got] == expected
            assert all(r.pool == "p" for r in got)
            ids = [tuple(map(int, r.stream_id.split("-"))) for r in got]
            assert ids == sorted(ids)
        assert [r.stream_id for r in results[0]] == [r.stream_id for r in results[1]]

    asyncio.run(scenario())


def test_replay_from_zero_and_clear_marker(redis_url: str, namespace: str) -> None:
    async def scenario() -> None:
        async with Registry(redis_url, namespace) as reg:
            await reg.register(make_info("w", pool="p"))  # restart → clear marker first
            await reg.publish_kv_events("w", [BlockStored(7, ROOT_HASH, 1)])
            cursor = {"p": "0"}
            records = await reg.read_kv_events(cursor)
            assert [r.event for r in records] == [AllBlocksCleared(), BlockStored(7, 0, 1)]
            assert cursor["p"] == records[-1].stream_id
            assert await reg.read_kv_events(cursor) == []  # nothing new, no blocking
            # Events of a worker registered elsewhere need the pool named explicitly.
            with pytest.raises(ValueError, match="pass pool="):
                await reg.publish_kv_events("other", [BlockEvicted(7, 1)])
            await reg.publish_kv_events("other", [BlockEvicted(7, 1)], pool="p2")
            assert [r.worker_id for r in await reg.read_kv_events({"p2": "0"})] == ["other"]

    asyncio.run(scenario())


def test_streams_are_trimmed(redis_url: str, namespace: str) -> None:
    async def scenario() -> None:
        async with Registry(redis_url, namespace, kv_stream_maxlen=10) as reg:
            await reg.register(make_info("w", pool="p"), clear_kv=False)
            events = [BlockStored(i, ROOT_HASH, i) for i in range(1, 1001)]
            await reg.publish_kv_events("w", events)
            kept = await reg.read_kv_events({"p": "0"}, count=10_000)
            # Approximate trimming keeps at least maxlen, at most about one node more.
            assert 10 <= len(kept) < 300
            assert kept[-1].event == events[-1]

    asyncio.run(scenario())
