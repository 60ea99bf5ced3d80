"""The decode worker's prealloc queue: FIFO, cancellation-safe, no block ever stranded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from decode_worker.admission import Admission
from engine.block_manager import BlockManager

pytestmark = pytest.mark.timeout(30)


class FakeEngine:
    """The two LLMEngine calls a reservation makes, over a real BlockManager."""

    def __init__(self, num_blocks: int) -> None:
        self.block_manager = BlockManager(num_blocks, 4)

    def reserve_blocks(self, count: int) -> list[int] | None:
        if count > self.block_manager.num_free_blocks:
            return None
        return self.block_manager.allocate_blocks(count)

    def free_reserved(self, block_ids: list[int]) -> None:
        self.block_manager.free_blocks(block_ids)


class FakeAsyncEngine:
    """Commands run in order on the loop, like AsyncEngine's thread runs them in order;
    ``call`` yields first, so a caller can be cancelled while its command is queued."""

    def __init__(self, num_blocks: int) -> None:
        self.engine = FakeEngine(num_blocks)

    @property
    def stats(self) -> Any:
        class Stats:
            free_blocks = self.engine.block_manager.num_free_blocks

        return Stats

    async def call(self, fn: Callable[[FakeEngine], Any]) -> Any:
        result = fn(self.engine)  # runs now (queued commands are never skipped) ...
        await asyncio.sleep(0)  # ... and the caller hears of it later, if still there
        return result

    def submit(self, fn: Callable[[FakeEngine], Any]) -> None:
        fn(self.engine)

    @property
    def used(self) -> int:
        return self.engine.block_manager.num_used_blocks


def test_fifo_order_and_give_back() -> None:
    async def scenario() -> None:
        engine = FakeAsyncEngine(10)
        admission = Admission(engine)  # type: ignore[arg-type]
        hog = engine.engine.reserve_blocks(8)
        order: list[str] = []

        async def want(name: str, count: int) -> None:
            reservation = await admission.reserve(count)
            order.append(name)
            admission.give_back(reservation)

        big = asyncio.ensure_future(want("big", 6))
        await asyncio.sleep(0.02)
        small = asyncio.ensure_future(want("small", 1))  # fits now, but must not overtake
        await asyncio.sleep(0.05)
        assert order == [] and admission.depth == 2
        engine.engine.free_reserved(hog)
        await asyncio.gather(big, small)
        assert order == ["big", "small"] and engine.used == 0 and admission.depth == 0

    asyncio.run(scenario())


def test_cancel_while_waiting_or_while_reserving_strands_nothing() -> None:
    async def scenario() -> None:
        engine = FakeAsyncEngine(4)
        admission = Admission(engine)  # type: ignore[arg-type]
        hog = engine.engine.reserve_blocks(4)
        waiting = asyncio.ensure_future(admission.reserve(2))
        await asyncio.sleep(0.02)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        engine.engine.free_reserved(hog)
        assert engine.used == 0 and admission.depth == 0
        # Cancelled after the engine reserved the blocks but before the caller heard back.
        for _ in range(20):
            task = asyncio.ensure_future(admission.reserve(3))
            await asyncio.sleep(0)  # the task reaches `await call(take)`
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert engine.used == 0

    asyncio.run(scenario())


def test_give_back_is_idempotent_and_skips_handed_over_blocks() -> None:
    async def scenario() -> None:
        engine = FakeAsyncEngine(4)
        admission = Admission(engine)  # type: ignore[arg-type]
        mine, theirs = await admission.reserve(2), await admission.reserve(2)
        theirs.handed_over = True  # a running request owns these now
        for _ in range(2):
            admission.give_back(mine)
            admission.give_back(theirs)
        assert engine.used == 2

    asyncio.run(scenario())
