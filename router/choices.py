"""A request's ``n`` choices, generated side by side through one Generator.

Lifecycle::

    run = Choices(generator, inputs)     # one task per choice, each draining its
                                         # Generator.generate into one queue
    async for index, chunk in run:       # chunks of every choice, in arrival order;
        ...                              # the first failing choice raises its error
    await run.close()                    # always: cancels what still runs, which
                                         # cancels those requests on the workers

A client that goes away closes the run (the HTTP handler's ``finally``), so its requests
stop on the workers too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from router.api import Chunk, GenerateInput
from router.generation import Generator

_DONE = object()


class Choices:
    def __init__(self, generator: Generator, inputs: Sequence[GenerateInput]) -> None:
        self._queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
        self._tasks = [
            asyncio.create_task(self._pump(generator, i, one)) for i, one in enumerate(inputs)
        ]
        self._running = len(self._tasks)

    async def _pump(self, generator: Generator, index: int, one: GenerateInput) -> None:
        try:
            async with contextlib.aclosing(generator.generate(one, None)) as chunks:
                async for chunk in chunks:
                    self._queue.put_nowait((index, chunk))
            self._queue.put_nowait((index, _DONE))
        except Exception as exc:  # the consumer raises it
            self._queue.put_nowait((index, exc))

    def __aiter__(self) -> AsyncIterator[tuple[int, Chunk]]:
        return self._events()

    async def _events(self) -> AsyncIterator[tuple[int, Chunk]]:
        while self._running:
            index, item = await self._queue.get()
            if item is _DONE:
                self._running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                assert isinstance(item, Chunk)
                yield index, item

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
