"""The prealloc queue: decode requests wait here, first come first served, for KV blocks.

A disaggregated request needs ``ceil(prompt_len / block_size)`` blocks reserved before its
prefill worker may send the KV. :meth:`Admission.reserve` queues the request and returns a
:class:`Reservation` once the engine had the blocks free; it is cancellation-safe, so a
request that gives up while waiting never strands blocks. Strict FIFO: a large prompt at
the head is not starved by small ones behind it. (Whether a prompt can *ever* fit is the
caller's check; a request that cannot would block the queue forever.)

Block ownership, the one rule that prevents leaks and double frees: a reservation's
``block_ids`` are written and freed only on the engine thread, by commands that run in
submission order — so a ``give_back`` submitted after a ``take`` always sees what the
``take`` reserved, however the awaiting coroutine was interrupted. Once the request joins
the running batch (``handed_over``), the engine owns the blocks and ``give_back`` is a no-op.
"""

from __future__ import annotations

import asyncio
from collections import deque

from engine.async_engine import AsyncEngine
from engine.llm_engine import LLMEngine

_POLL_S = 0.005  # how often the head of the queue re-checks the engine's free blocks


class Reservation:
    """KV blocks reserved for one prompt, to be filled by a KV transfer."""

    __slots__ = ("block_ids", "handed_over", "num_blocks")

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.block_ids: list[int] | None = None  # engine thread only
        self.handed_over = False  # the engine's request owns the blocks now

    def take(self, engine: LLMEngine) -> bool:
        """Engine thread: reserve the blocks if they are free now."""
        self.block_ids = engine.reserve_blocks(self.num_blocks)
        return self.block_ids is not None

    def give_back(self, engine: LLMEngine) -> None:
        """Engine thread: free the blocks unless they were handed over (idempotent)."""
        if self.block_ids is not None and not self.handed_over:
            engine.free_reserved(self.block_ids)
        self.block_ids = None


class Admission:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._queue: deque[Reservation] = deque()

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def reserve(self, num_blocks: int) -> Reservation:
        """Wait (FIFO) until ``num_blocks`` are reserved; cancel it to give up."""
        reservation = Reservation(num_blocks)
        self._queue.append(reservation)
        try:
            while True:
                # The stats snapshot is a cheap hint; the engine thread decides for real.
                if (
                    self._queue[0] is reservation
                    and (self._engine.stats.free_blocks >= num_blocks)
                    and await self._engine.call(reservation.take)
                ):
                    return reservation
                await asyncio.sleep(_POLL_S)
        except BaseException:
            self.give_back(reservation)  # runs after any take() already submitted
            raise
        finally:
            self._queue.remove(reservation)

    def give_back(self, reservation: Reservation) -> None:
        """Free the reservation's blocks (if still ours), from any coroutine, even a
        cancelled one: nothing is awaited."""
        self._engine.submit(reservation.give_back)
