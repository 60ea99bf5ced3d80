"""The admission queue's policy (common.admission) and the gate over it
(common.admission_gate): bounds, priority order, fairness across client ids, refusals."""

from __future__ import annotations

import asyncio
import time

import pytest

from common.admission import AdmissionQueue, QueueFull
from common.admission_gate import (
    DEADLINE,
    DISPLACED,
    MIN_RETRY_AFTER_MS,
    QUEUE_FULL,
    QUEUE_WAIT,
    AdmissionGate,
    Refused,
)
from common.errors import ErrorCode
from router.admission import RouterAdmission
from router.config import PoolConfig
from router.metrics import RouterMetrics


def _drain(queue: AdmissionQueue[str]) -> list[str]:
    out = []
    while (item := queue.pop()) is not None:
        out.append(item)
    return out


def test_fifo_within_one_client_and_class() -> None:
    q: AdmissionQueue[str] = AdmissionQueue(10)
    for name in "abc":
        q.push(name)
    assert _drain(q) == ["a", "b", "c"]
    assert len(q) == 0 and q.pop() is None


def test_higher_priority_is_admitted_first() -> None:
    q: AdmissionQueue[str] = AdmissionQueue(10)
    q.push("n1", 0)
    q.push("n2", 0)
    q.push("h1", 1)
    q.push("n3", 0)
    q.push("h2", 1)
    assert _drain(q) == ["h1", "h2", "n1", "n2", "n3"]


def test_round_robin_across_clients_within_a_class() -> None:
    q: AdmissionQueue[str] = AdmissionQueue(100)
    for i in range(5):
        q.push(f"heavy{i}", 0, "heavy")
    q.push("light0", 0, "light")
    q.push("other0", 0, "other")
    q.push("light1", 0, "light")
    order = _drain(q)
    # the heavy caller queued first but cannot make the light callers wait behind all of it
    assert order[:5] == ["heavy0", "light0", "other0", "heavy1", "light1"]
    assert order[5:] == ["heavy2", "heavy3", "heavy4"]


def test_priority_beats_fairness() -> None:
    q: AdmissionQueue[str] = AdmissionQueue(10)
    q.push("a0", 0, "a")
    q.push("b0", 1, "b")
    q.push("b1", 1, "b")
    assert _drain(q) == ["b0", "b1", "a0"]


def test_bound_refuses_equal_priority() -> None:
    q: AdmissionQueue[str] = AdmissionQueue(2)
    q.push("a")
    q.push("b")
    with pytest.raises(QueueFull):
        q.push("c")
    with pytest.raises(QueueFull):
        q.push("c", -1)
    assert len(q) == 2


def test_higher_priority_displaces_the_newest_lowest() -> None:
    q: AdmissionQueue[str] = AdmissionQueue(3)
    q.push("old", 0, "x")
    q.push("mid", 0, "y")
    q.push("new", 0, "x")
    assert q.push("vip", 1) == "new"
    assert "new" not in q
    assert _drain(q) == ["vip", "old", "mid"]


def test_zero_sized_queue_refuses_everything() -> None:
    q: AdmissionQueue[str] = AdmissionQueue(0)
    with pytest.raises(QueueFull):
        q.push("a", 5)


def test_remove_and_depths() -> None:
    q: AdmissionQueue[str] = AdmissionQueue(10)
    q.push("a", 0, "x")
    q.push("b", 1, "y")
    q.push("c", 0, "x")
    assert q.depth_by_priority() == {0: 2, 1: 1}
    assert q.remove("a") and not q.remove("a")
    assert _drain(q) == ["b", "c"]
    with pytest.raises(ValueError):
        AdmissionQueue(-1)


def test_duplicate_push_is_an_error() -> None:
    q: AdmissionQueue[str] = AdmissionQueue(10)
    q.push("a")
    with pytest.raises(ValueError):
        q.push("a")


# ---- the gate ---------------------------------------------------------------------------------


def test_gate_admits_in_priority_order_and_refuses_fast() -> None:
    async def main() -> None:
        gate = AdmissionGate("pool chat", max_active=1, max_queued=2)
        first = await gate.acquire()
        order: list[str] = []

        async def wait(name: str, priority: int) -> None:
            slot = await gate.acquire(priority)
            order.append(name)
            slot.release()

        low = asyncio.create_task(wait("low", 0))
        await asyncio.sleep(0)
        high = asyncio.create_task(wait("high", 1))
        await asyncio.sleep(0)
        assert gate.queued == 2
        started = time.perf_counter()
        with pytest.raises(Refused) as info:
            await gate.acquire(0)
        assert time.perf_counter() - started < 0.01
        assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED
        assert info.value.reason == QUEUE_FULL
        assert info.value.retry_after_ms is not None
        assert info.value.retry_after_ms >= MIN_RETRY_AFTER_MS
        assert "pool chat" in info.value.message
        first.release()
        first.release()  # idempotent
        await asyncio.gather(low, high)
        assert order == ["high", "low"]
        assert gate.active == 0 and gate.queued == 0

    asyncio.run(main())


def test_gate_displacement_deadline_and_cancel_hold_nothing() -> None:
    async def main() -> None:
        gate = AdmissionGate("w", max_active=1, max_queued=1)
        held = await gate.acquire()
        victim = asyncio.create_task(gate.acquire(0))
        await asyncio.sleep(0)
        vip = asyncio.create_task(gate.acquire(1))
        await asyncio.sleep(0)
        with pytest.raises(Refused) as info:
            await victim
        assert info.value.reason == DISPLACED
        vip.cancel()
        with pytest.raises(asyncio.CancelledError):
            await vip
        assert gate.queued == 0
        with pytest.raises(Refused) as late:
            await gate.acquire(deadline=time.monotonic() + 0.02)
        assert late.value.code is ErrorCode.DEADLINE_EXCEEDED and late.value.reason == DEADLINE
        assert gate.queued == 0 and gate.active == 1
        held.release()
        assert gate.active == 0
        again = await gate.acquire()
        assert again.waited_s == 0.0
        again.release()

    asyncio.run(main())


def test_gate_retry_hint_follows_hold_time() -> None:
    async def main() -> None:
        gate = AdmissionGate("w", max_active=2, max_queued=8)
        for _ in range(20):  # short holds pull the estimate down from its 1 s prior
            slot = await gate.acquire()
            slot.release()
        assert gate.retry_after_ms() == MIN_RETRY_AFTER_MS
        with pytest.raises(ValueError):
            AdmissionGate("w", max_active=0, max_queued=1)

    asyncio.run(main())


def test_router_pool_queue_is_fair_and_counts_refusals() -> None:
    async def main() -> None:
        metrics = RouterMetrics()
        admission = RouterAdmission([PoolConfig("chat", max_in_flight=1, max_queued=4)], metrics)
        order: list[str] = []
        release = asyncio.Event()

        async def one(name: str, client: str) -> None:
            async with admission.admitted("chat", 0, client, None):
                order.append(name)
                await release.wait()

        tasks = [asyncio.create_task(one("heavy0", "heavy"))]
        await asyncio.sleep(0)
        for name, client in (("heavy1", "heavy"), ("heavy2", "heavy"), ("light0", "light")):
            tasks.append(asyncio.create_task(one(name, client)))
            await asyncio.sleep(0)
        tasks.append(asyncio.create_task(one("heavy3", "heavy")))
        await asyncio.sleep(0)
        with pytest.raises(Refused):  # 1 in flight + 4 queued: the sixth is refused
            async with admission.admitted("chat", 0, "heavy", None):
                pass
        release.set()
        await asyncio.gather(*tasks)
        assert order == ["heavy0", "heavy1", "light0", "heavy2", "heavy3"]
        text = metrics.metrics.render().decode()
        assert 'router_rejections_total{pool="chat",reason="queue_full"} 1.0' in text
        assert 'router_admission_queue_seconds_count{pool="chat"} 5.0' in text
        assert 'router_admission_queue_depth{pool="chat"} 0.0' in text

    asyncio.run(main())


def test_gate_refuses_an_arrival_expected_to_wait_past_its_budget() -> None:
    async def main() -> None:
        gate = AdmissionGate("w", max_active=1, max_queued=8, max_queue_wait_s=1.5)
        held = await gate.acquire()  # the 1 s prior: the first queued one expects 1 s
        first = asyncio.create_task(gate.acquire(0))
        await asyncio.sleep(0)
        assert gate.queued == 1 and gate.expected_wait_s(0) == pytest.approx(2.0)
        with pytest.raises(Refused) as info:
            await gate.acquire(0)  # would wait ~2 s: refused, not queued
        assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED
        assert info.value.reason == QUEUE_WAIT and info.value.retry_after_ms is not None
        assert gate.queued == 1
        vip = asyncio.create_task(gate.acquire(1))  # nobody ahead at its priority: ~1 s
        await asyncio.sleep(0)
        assert gate.queued == 2
        held.release()
        (await vip).release()
        (await first).release()
        assert gate.active == 0 and gate.queued == 0
        with pytest.raises(ValueError):
            AdmissionGate("w", max_active=1, max_queued=1, max_queue_wait_s=0)

    asyncio.run(main())
