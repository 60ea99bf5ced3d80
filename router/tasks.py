"""Stopping background tasks reliably.

A plain ``task.cancel(); await task`` can hang: some libraries catch ``CancelledError``
inside a network call (redis-py does, in places) and carry on, so the task resumes its loop
with the cancellation consumed. :func:`cancel_and_wait` cancels again until the task is
really done, with an overall bound.
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[object] | None, timeout_s: float = 5.0) -> None:
    """Cancel ``task`` (repeatedly if it swallows it) until done or ``timeout_s`` passed."""
    if task is None:
        return
    deadline = time.monotonic() + timeout_s
    while not task.done():
        if time.monotonic() > deadline:
            log.warning("task %s did not stop within %.1fs", task.get_name(), timeout_s)
            return
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)
    if not task.cancelled() and task.exception() is not None:
        log.warning("task %s ended with %r", task.get_name(), task.exception())
