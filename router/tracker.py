"""The router's own bookkeeping per worker: requests in flight and recent failures.

Load reports arrive once per heartbeat; a burst of requests in between would all see the
same numbers and pile onto one worker. So the router counts what *it* has sent: each
routed request takes a :class:`Ticket` (prompt tokens pending on its prefill worker, one
open stream on its decode worker), marks the first token (the prefill part is done) and
closes it when the stream ends, however it ends. It also remembers, for a few seconds,
when work finished, so a policy can discount a load report taken before that. Policies
read all of it through :meth:`WorkerTracker.pending` as immutable
:class:`~router.snapshot.Pending` values.

A worker that just failed a request is *quarantined* for ``quarantine_s``: policies avoid it
while another candidate exists, which bridges the gap until its registration expires.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TypeVar

from router.snapshot import NO_PENDING, Pending

T = TypeVar("T")
_DONE_WINDOW_S = 5.0  # load reports are fresher than this (heartbeats are ~0.25 s)
_DONE_MAX = 64


@dataclass(slots=True)
class Ticket:
    prefill_id: str | None
    decode_id: str
    prompt_tokens: int
    prefill_done: bool = False
    closed: bool = False


class WorkerTracker:
    def __init__(
        self,
        quarantine_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._quarantine_s = quarantine_s
        self._clock = clock
        self._wall_clock = wall_clock  # comparable with WorkerLoad.updated_at
        self._pending: dict[str, Pending] = {}
        self._view = MappingProxyType(self._pending)
        self._quarantine: dict[str, float] = {}  # worker id → until

    @property
    def pending(self) -> Mapping[str, Pending]:
        """Read-only live view: worker id → what this router has in flight there."""
        return self._view

    def open(self, prefill_id: str | None, decode_id: str, prompt_tokens: int) -> Ticket:
        """Record a request just routed; ``prefill_id`` None when decode prefills itself."""
        prefill_worker = prefill_id or decode_id
        self._bump(prefill_worker, prefill_tokens=prompt_tokens, routed=1)
        if prefill_id is not None:
            self._bump(decode_id, requests=1, routed=1)
        else:
            self._bump(decode_id, requests=1)
        return Ticket(prefill_id, decode_id, prompt_tokens)

    def first_token(self, ticket: Ticket) -> None:
        if ticket.prefill_done or ticket.closed:
            return
        ticket.prefill_done = True
        worker_id = ticket.prefill_id or ticket.decode_id
        self._bump(worker_id, prefill_tokens=-ticket.prompt_tokens)
        p = self._pending[worker_id]
        now = self._wall_clock()
        done = _recent((*p.prefills_done, (now, ticket.prompt_tokens)), now, lambda d: d[0])
        self._pending[worker_id] = replace(p, prefills_done=done)

    def close(self, ticket: Ticket) -> None:
        """End of the request on these workers (finished, failed or cancelled); idempotent."""
        if ticket.closed:
            return
        self.first_token(ticket)
        ticket.closed = True
        self._bump(ticket.decode_id, requests=-1)
        p = self._pending[ticket.decode_id]
        now = self._wall_clock()
        done = _recent((*p.streams_done, now), now, lambda at: at)
        self._pending[ticket.decode_id] = replace(p, streams_done=done)

    def quarantine(self, worker_id: str) -> None:
        self._quarantine[worker_id] = self._clock() + self._quarantine_s

    def release(self, worker_id: str) -> None:
        """End ``worker_id``'s quarantine now (it is known to serve again)."""
        self._quarantine.pop(worker_id, None)

    def quarantined(self) -> frozenset[str]:
        """Workers quarantined now (empty, and cheap, in the normal case)."""
        if not self._quarantine:
            return frozenset()
        now = self._clock()
        for worker_id in [w for w, until in self._quarantine.items() if until < now]:
            del self._quarantine[worker_id]
        return frozenset(self._quarantine)

    def retain(self, live_workers: Iterable[str]) -> None:
        """Forget idle workers that left the registry (keeps the maps bounded)."""
        live = set(live_workers)
        for worker_id in [w for w, p in self._pending.items() if w not in live]:
            p = self._pending[worker_id]
            if p.requests == 0 and p.prefill_tokens == 0:
                del self._pending[worker_id]
        for worker_id in [w for w in self._quarantine if w not in live]:
            del self._quarantine[worker_id]

    def _bump(
        self, worker_id: str, requests: int = 0, prefill_tokens: int = 0, routed: int = 0
    ) -> None:
        p = self._pending.get(worker_id, NO_PENDING)
        self._pending[worker_id] = replace(
            p,
            requests=p.requests + requests,
            prefill_tokens=p.prefill_tokens + prefill_tokens,
            routed=p.routed + routed,
        )


def _recent(entries: tuple[T, ...], now: float, at: Callable[[T], float]) -> tuple[T, ...]:
    horizon = now - _DONE_WINDOW_S
    return tuple(e for e in entries[-_DONE_MAX:] if at(e) >= horizon)
