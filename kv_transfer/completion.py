"""How the transport learns that a wire operation is through: polled against a host deadline.

The two backends differ where it hurts: a gloo ``work.wait(timeout)`` blocks the calling
thread until the bytes moved (or the timeout, which closes gloo's pair), while an NCCL
``work.wait()`` returns at once and only makes the *current CUDA stream* wait for the
communication — a host that "waited" has observed nothing, and a timeout passed to it
bounds nothing. So the host keeps the deadline itself, the same one on both backends
(:class:`WaitBudget`), and observes completion in the way that works for the backend:

* NCCL (``Completion.POLLED``): ``work.is_completed()`` is polled with a short
  exponential back-off until the deadline (:func:`poll_work`); only then is ``wait()``
  called, to surface the operation's error and order the current stream after it.
* gloo (``Completion.BLOCKING``): one ``work.wait(remaining)``. Polling cannot be used
  there: a gloo send/recv ``Work`` is marked completed only inside ``wait()`` — measured
  on torch 2.13, ``is_completed()`` stays False for a receive whose bytes have landed.

Every deadline is also clamped below the group's own timeout (:class:`WaitBudget`), so on
NCCL the watchdog never aborts the communicator under a wait the host still considers
live. When the host deadline passes, the caller tears the pair down (gloo: a 1 ms wait on
the pending operation closes gloo's pair, so its IO thread touches the buffer no more;
NCCL: the communicator is aborted) — the same path on both backends.

CUDA streams: on a CUDA cache each pair runs its sends, receives and staging copies on a
stream of its own (:class:`PairStream`), so NCCL's kernels wait on that stream rather than
on the compute stream, and a layer's transfer overlaps the next layer's compute. The
prefill side orders the pair's stream after the compute that produced a layer with an
event recorded when the layer is marked ready (:func:`record_ready`); the decode side
observes the end of landing with an event on the pair's stream, polled like a work. On
CPU all of this is a no-op.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import torch

FIRST_SLEEP_S = 20e-6  # the first back-off; doubled after every poll that found it pending
ABANDON_S = 0.001  # gloo: a wait this short on a pending op closes its pair


class Completion(Enum):
    """How a link observes that an operation is through (see the module docstring)."""

    BLOCKING = "blocking"  # gloo: a bounded wait(timeout) blocks the host
    POLLED = "polled"  # NCCL: is_completed() polled against the host deadline


class Completable(Protocol):
    """What :func:`poll_work` needs: a c10d ``Work`` or a CUDA ``Event`` (``query``)."""

    def is_completed(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class WaitBudget:
    """How long any single wait may last, and how fast it polls.

    ``max_wait_s`` stays below the process group's timeout (NCCL's watchdog) by a margin;
    ``max_sleep_s`` caps the back-off while a transfer is in flight, ``idle_sleep_s``
    while a pair waits for its next transfer."""

    max_wait_s: float
    max_sleep_s: float = 0.0005
    idle_sleep_s: float = 0.002

    @classmethod
    def for_group(cls, group_timeout_s: float, max_sleep_s: float = 0.0005) -> WaitBudget:
        """90 % of the group timeout, and at least 1 s less than it."""
        bound = min(group_timeout_s * 0.9, group_timeout_s - 1.0)
        return cls(max(bound, 0.001), max_sleep_s)

    def deadline(self, timeout_s: float, now: float) -> float:
        return now + max(min(timeout_s, self.max_wait_s), 0.0)


def poll_work(
    work: Completable,
    deadline: float,
    max_sleep_s: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    stop: Callable[[], bool] | None = None,
) -> bool:
    """Poll ``work.is_completed()`` until it is True (→ True) or ``deadline`` passes or
    ``stop()`` says so (→ False). Never blocks in the backend; sleeps at most
    ``max_sleep_s`` at a time and never past the deadline."""
    pause = FIRST_SLEEP_S
    while True:
        if work.is_completed():
            return True
        now = clock()
        if now >= deadline or (stop is not None and stop()):
            return False
        sleep(min(pause, max_sleep_s, deadline - now))
        pause *= 2


class EventWork:
    """A CUDA event seen as a work: ``is_completed`` is ``query``."""

    def __init__(self, event: torch.cuda.Event) -> None:
        self._event = event

    def is_completed(self) -> bool:
        return bool(self._event.query())


def run_on(stream: PairStream | None, body: Callable[[], None]) -> None:
    """A pair thread's body: on CUDA every op and copy of the pair runs on ``stream``."""
    if stream is None:
        body()
        return
    with stream.active():
        body()


class PairStream:
    """A pair's CUDA stream (None on CPU): the pair thread runs all its ops inside
    :meth:`active`; :meth:`after` orders it after an event of the compute stream;
    :meth:`landed` is an event to poll for everything queued on it so far."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.stream is None:
            yield
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            yield

    def after(self, event: torch.cuda.Event | None) -> None:
        if self.stream is not None and event is not None:
            self.stream.wait_event(event)

    def landed(self) -> EventWork | None:
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return EventWork(event)


def record_ready(device: torch.device) -> torch.cuda.Event | None:
    """On CUDA, an event on the caller's current stream (the compute that just wrote a
    layer's KV); None on CPU, where the host call already ordered everything."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event
