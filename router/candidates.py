"""Shortlists: which of a big pool's workers a routing decision scores at all.

Scoring every worker of a 1,000-worker pool per request costs milliseconds; the answer
almost always lies among a few workers. So each registry refresh sorts the pool once by
what the load reports say (:class:`LoadOrder`, built by
:class:`~router.registry_view.RegistryView`), and a decision scores only

- the workers the prefix index matched (the index bounds how many), and
- the head of the load order, walked until ``QUIET`` (8) workers are found whose cost
  cannot exceed their report's — for prefill no prompt tokens this router sent are
  pending there, for decode no more open streams than the report counts and room for the
  prompt — and that the request may use (not avoided, quarantined or refused). Workers
  passed on the way are scored too, with their real cost.

The policy then scores that shortlist exactly as it would the whole pool. The result is the
same as scoring everyone except (1) a worker whose report overstates its load because this
router saw its work finish after the report (it ranks right again at the next refresh),
and (2) ties beyond the shortlist, which go to the workers that the refresh's tie order
put first (that order is reshuffled every refresh, so ties still spread over the pool).
The work per decision grows with the router's own requests in flight, not with the fleet.
Pools of at most ``NARROW_ABOVE`` workers are scored in full (results identical to before).
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from router.policies import RouteQuery, fits, kv_use
from router.snapshot import NO_PENDING, Pending, WorkerView

NARROW_ABOVE = 64  # pools up to this size are scored in full
QUIET = 8  # workers at their reported cost that a shortlist must hold


@dataclass(frozen=True, slots=True)
class LoadOrder:
    """One refresh's workers of a pool, least loaded (by their reports) first."""

    prefill: tuple[WorkerView, ...] = ()  # by queued prefill tokens
    decode: tuple[WorkerView, ...] = ()  # by running + queued requests, then KV use
    colocated: tuple[WorkerView, ...] = ()  # by queued prefill tokens
    by_id: Mapping[str, WorkerView] = field(default_factory=dict)


def load_order(
    prefill: Sequence[WorkerView],
    decode: Sequence[WorkerView],
    colocated: Sequence[WorkerView],
    epoch: int,
) -> LoadOrder:
    """Sort once per refresh; ties in an order that changes with ``epoch`` (the same
    in every process)."""

    def tie(w: WorkerView) -> int:
        # crc32, not hash(str): str hashes change from process to process, and a simulated
        # fleet (capacity/sim) must give the same run for the same seed every time
        return hash((epoch, zlib.crc32(w.worker_id.encode())))

    def by_prefill(w: WorkerView) -> tuple[int, int]:
        return (w.load.queued_prefill_tokens if w.load is not None else 0, tie(w))

    def by_decode(w: WorkerView) -> tuple[float, int]:
        reported = w.load.running + w.load.queued if w.load is not None else 0
        return (reported + kv_use(w), tie(w))

    return LoadOrder(
        prefill=tuple(sorted(prefill, key=by_prefill)),
        decode=tuple(sorted(decode, key=by_decode)),
        colocated=tuple(sorted(colocated, key=by_prefill)),
        by_id={w.worker_id: w for w in (*prefill, *decode, *colocated)},
    )


def prefill_shortlist(
    order: Sequence[WorkerView],
    by_id: Mapping[str, WorkerView],
    query: RouteQuery,
    pending: Mapping[str, Pending],
    skip: Collection[str],
) -> list[WorkerView]:
    """Matched workers + the head of ``order`` up to ``QUIET`` usable quiet ones."""
    role = order[0].info.role if order else None
    picked = {
        i: w
        for i in query.matched_blocks
        if (w := by_id.get(i)) is not None and w.info.role is role
    }
    quiet = 0
    for w in order:
        worker_id = w.worker_id
        picked[worker_id] = w
        if worker_id not in skip and pending.get(worker_id, NO_PENDING).prefill_tokens == 0:
            quiet += 1
            if quiet >= QUIET:
                break
    return list(picked.values())


def decode_shortlist(
    order: Sequence[WorkerView],
    query: RouteQuery,
    pending: Mapping[str, Pending],
    skip: Collection[str],
) -> list[WorkerView]:
    """The head of ``order`` up to ``QUIET`` usable quiet workers with room for the prompt."""
    picked: list[WorkerView] = []
    quiet = 0
    for w in order:
        picked.append(w)
        if w.worker_id in skip or not fits(w, query):
            continue
        # batch_size() = max(report less what finished, requests pending): at most the report
        reported = w.load.running + w.load.queued if w.load is not None else 0
        if pending.get(w.worker_id, NO_PENDING).requests <= reported:
            quiet += 1
            if quiet >= QUIET:
                break
    return picked
