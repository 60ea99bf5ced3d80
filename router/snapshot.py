"""Immutable views of a pool's workers, as routing policies see them.

:class:`~router.registry_view.RegistryView` builds a :class:`PoolSnapshot` from Redis every
``refresh_interval_s``; the router's own bookkeeping (what it has sent and not yet seen
finish) is a :class:`Pending` per worker. Policies read both and mutate neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.worker_info import WorkerInfo, WorkerLoad

if TYPE_CHECKING:
    from router.candidates import LoadOrder


@dataclass(frozen=True, slots=True)
class WorkerView:
    info: WorkerInfo
    load: WorkerLoad | None  # None: no load report yet
    worker_id: str = field(init=False)  # info.worker_id, a plain field: policies read it a lot

    def __post_init__(self) -> None:
        object.__setattr__(self, "worker_id", self.info.worker_id)

    @property
    def draining(self) -> bool:
        return self.load is not None and self.load.draining


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """Live, non-draining workers of one pool at one moment, each list sorted by id."""

    pool: str
    prefill: tuple[WorkerView, ...] = ()
    decode: tuple[WorkerView, ...] = ()
    colocated: tuple[WorkerView, ...] = ()
    taken_at: float = 0.0  # time.monotonic() of the refresh
    draining: tuple[str, ...] = field(default=())  # ids left out because they drain
    # The same workers sorted by load, for shortlists in big pools (router.candidates);
    # None: score every worker.
    order: LoadOrder | None = None

    @property
    def block_size(self) -> int | None:
        """The pool's block size (prefix hashing unit); None without workers."""
        for group in (self.prefill, self.colocated, self.decode):
            if group:
                return group[0].info.geometry.block_size
        return None

    @property
    def num_live(self) -> int:
        return len(self.prefill) + len(self.decode) + len(self.colocated)


@dataclass(frozen=True, slots=True)
class Pending:
    """What this router has in flight on one worker (its load report may be stale)."""

    requests: int = 0  # streams open through this worker
    prefill_tokens: int = 0  # prompt tokens sent for prefill whose first token is not back
    routed: int = 0  # requests ever routed here by this router (tie-breaks spread on it)
    # Recent completions (unix time, amount), newest last, a few seconds' worth: a load
    # report older than a completion still counts that work, so policies subtract it.
    prefills_done: tuple[tuple[float, int], ...] = ()  # (first token at, prompt tokens)
    streams_done: tuple[float, ...] = ()  # stream closed at

    def prefill_tokens_done_since(self, when: float) -> int:
        return sum(tokens for at, tokens in self.prefills_done if at > when)

    def streams_done_since(self, when: float) -> int:
        return sum(1 for at in self.streams_done if at > when)


NO_PENDING = Pending()
