"""One routing decision: a pool snapshot + a policy + the prefix match → workers.

:func:`decide` is pure: it reads the snapshot, the policy's ranking and the router's
pending counts, and returns a :class:`Decision` or raises the public error. The caller
records the decision (prefix-index prediction, tracker ticket) and sends the request.

Pool shapes, from the live workers:

- prefill and decode workers → disaggregated: a prefill worker and a decode worker;
- colocated workers → one worker does both (ranked by the prefill question, so prefix
  reuse still counts);
- decode workers only → a decode worker prefills locally (no prefill target).

Candidates a retry must avoid (``avoid``) or that the router quarantined are skipped while
others remain; decode workers that refused the request (``refused``) are never retried.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.errors import ErrorCode, RequestError
from router.policies import Pick, RouteQuery, RoutingPolicy
from router.snapshot import Pending, PoolSnapshot, WorkerView


@dataclass(frozen=True, slots=True)
class Decision:
    pool: str
    policy: str
    prefill: WorkerView | None  # None: the decode worker prefills itself
    decode: WorkerView
    predicted_cached_tokens: int
    prefill_scores: tuple[tuple[str, float], ...] = ()
    decode_scores: tuple[tuple[str, float], ...] = ()

    @property
    def prefill_worker_id(self) -> str | None:
        return self.prefill.worker_id if self.prefill is not None else None


def decide(
    snapshot: PoolSnapshot,
    policy: RoutingPolicy,
    query: RouteQuery,
    pending: Mapping[str, Pending],
    *,
    avoid: frozenset[str] = frozenset(),
    refused: frozenset[str] = frozenset(),
    quarantined: frozenset[str] = frozenset(),
) -> Decision:
    """The workers for one request attempt; RequestError if the pool cannot take it."""
    if snapshot.num_live == 0:
        raise RequestError(ErrorCode.UNAVAILABLE, f"pool {snapshot.pool!r} has no live worker")
    shunned = avoid | quarantined

    def preferred(workers: Sequence[WorkerView]) -> Sequence[WorkerView]:
        if not shunned:
            return workers
        for skip in (shunned, avoid):
            chosen = [w for w in workers if w.worker_id not in skip]
            if chosen:
                return chosen
        return workers

    def takers(workers: Sequence[WorkerView]) -> Sequence[WorkerView]:
        if not refused:
            return preferred(workers)
        left = [w for w in workers if w.worker_id not in refused]
        if not left:
            raise RequestError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"every worker of pool {snapshot.pool!r} refused the request "
                f"({', '.join(sorted(refused))})",
            )
        return preferred(left)

    if snapshot.prefill:
        if not snapshot.decode:
            raise RequestError(
                ErrorCode.UNAVAILABLE, f"pool {snapshot.pool!r} has no live decode worker"
            )
        prefill = policy.pick_prefill(preferred(snapshot.prefill), query, pending)
        decode = policy.pick_decode(takers(snapshot.decode), query, pending)
        return _decision(snapshot, policy, prefill, decode, prefill.cached_tokens)
    if snapshot.colocated:
        pick = policy.pick_prefill(takers(snapshot.colocated), query, pending)
        return _decision(snapshot, policy, None, pick, pick.cached_tokens)
    if snapshot.decode:
        pick = policy.pick_decode(takers(snapshot.decode), query, pending)
        return _decision(snapshot, policy, None, pick, 0)
    raise RequestError(ErrorCode.UNAVAILABLE, f"pool {snapshot.pool!r} has no live worker")


def _decision(
    snapshot: PoolSnapshot,
    policy: RoutingPolicy,
    prefill: Pick | None,
    decode: Pick,
    cached: int,
) -> Decision:
    return Decision(
        pool=snapshot.pool,
        policy=policy.name,
        prefill=prefill.worker if prefill is not None else None,
        decode=decode.worker,
        predicted_cached_tokens=cached,
        prefill_scores=prefill.scores if prefill is not None else (),
        decode_scores=decode.scores,
    )
