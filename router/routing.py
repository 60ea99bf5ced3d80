"""One routing decision: a pool snapshot + a policy + the prefix match → workers.

:func:`decide` is pure: it reads the snapshot, the policy's ranking and the router's
pending counts, and returns a :class:`Decision` or raises the public error. The caller
records the decision (prefix-index prediction, tracker ticket) and sends the request.

Pool shapes, from the live workers:

- prefill and decode workers → disaggregated: a prefill worker and a decode worker — or,
  when the pool has ``conditional`` thresholds and :func:`router.disagg_policy.decide_prefill`
  says so, the decode worker alone (it prefills locally);
- colocated workers → one worker does both (ranked by the prefill question, so prefix
  reuse still counts);
- decode workers only → a decode worker prefills locally (no prefill target).

Candidates a retry must avoid (``avoid``) or that the router quarantined are skipped while
others remain; decode workers that refused the request (``refused``) are never retried.

In pools bigger than :data:`router.candidates.NARROW_ABOVE` the ``prefix_aware`` policy
scores a shortlist (:mod:`router.candidates`: the matched workers and the head of the
snapshot's load order) instead of every worker, so a decision costs the same at 10 workers
as at 2,000. Other policies (round robin, random, least loaded) see the whole pool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.errors import ErrorCode, RequestError
from router.candidates import NARROW_ABOVE, decode_shortlist, prefill_shortlist
from router.config import Policy
from router.disagg_policy import DisaggThresholds, PrefillChoice, PrefillInputs, decide_prefill
from router.policies import (
    Pick,
    RouteQuery,
    RoutingPolicy,
    batch_size,
    prefer_paired,
    queued_prefill_tokens,
)
from router.snapshot import NO_PENDING, Pending, PoolSnapshot, WorkerView


@dataclass(frozen=True, slots=True)
class Decision:
    pool: str
    policy: str
    prefill: WorkerView | None  # None: the decode worker prefills itself
    decode: WorkerView
    predicted_cached_tokens: int
    prefill_scores: tuple[tuple[str, float], ...] = ()
    decode_scores: tuple[tuple[str, float], ...] = ()
    # Disaggregated pools only: remote or local, and why (with the inputs, for the log).
    prefill_choice: PrefillChoice | None = None
    prefill_inputs: PrefillInputs | None = None

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
    conditional: DisaggThresholds | None = None,
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

    prefill_pool, decode_pool, colocated_pool = _candidates(
        snapshot, policy, query, pending, shunned | refused
    )
    if snapshot.prefill:
        if not snapshot.decode:
            raise RequestError(
                ErrorCode.UNAVAILABLE, f"pool {snapshot.pool!r} has no live decode worker"
            )
        prefill = policy.pick_prefill(preferred(prefill_pool), query, pending)
        decoders = takers(decode_pool)
        decode = policy.pick_decode(decoders, query, pending)
        decode = prefer_paired(decode, decoders, prefill.worker, query)  # no new KV group
        if conditional is None:
            return _decision(snapshot, policy, prefill, decode, prefill.cached_tokens)
        inputs = PrefillInputs(
            num_tokens=query.num_tokens,
            prefill_cached=prefill.cached_tokens,
            decode_cached=query.cached_tokens(decode.worker.worker_id),
            prefill_queue_tokens=queued_prefill_tokens(
                prefill.worker, pending.get(prefill.worker.worker_id, NO_PENDING)
            ),
            decode_running=batch_size(
                decode.worker, pending.get(decode.worker.worker_id, NO_PENDING)
            ),
        )
        choice = decide_prefill(conditional, inputs)
        if choice.remote:
            cached = prefill.cached_tokens
            return _decision(snapshot, policy, prefill, decode, cached, choice, inputs)
        # The prefill pick stays in the log (prefill_scores): what local was chosen over.
        return Decision(
            pool=snapshot.pool,
            policy=policy.name,
            prefill=None,
            decode=decode.worker,
            predicted_cached_tokens=inputs.decode_cached,
            prefill_scores=prefill.scores,
            decode_scores=decode.scores,
            prefill_choice=choice,
            prefill_inputs=inputs,
        )
    if snapshot.colocated:
        pick = policy.pick_prefill(takers(colocated_pool), query, pending)
        return _decision(snapshot, policy, None, pick, pick.cached_tokens)
    if snapshot.decode:
        pick = policy.pick_decode(takers(decode_pool), query, pending)
        return _decision(snapshot, policy, None, pick, pick.cached_tokens)
    raise RequestError(ErrorCode.UNAVAILABLE, f"pool {snapshot.pool!r} has no live worker")


def _candidates(
    snapshot: PoolSnapshot,
    policy: RoutingPolicy,
    query: RouteQuery,
    pending: Mapping[str, Pending],
    skip: frozenset[str],
) -> tuple[Sequence[WorkerView], Sequence[WorkerView], Sequence[WorkerView]]:
    """The prefill, decode and colocated workers to score: all, or shortlists."""
    order = snapshot.order
    if order is None or policy.name != Policy.PREFIX_AWARE.value:
        return snapshot.prefill, snapshot.decode, snapshot.colocated

    def big(group: Sequence[WorkerView]) -> bool:
        return len(group) > NARROW_ABOVE

    prefill, decode, colocated = snapshot.prefill, snapshot.decode, snapshot.colocated
    if big(prefill):
        prefill = prefill_shortlist(order.prefill, order.by_id, query, pending, skip)
    if big(decode):
        decode = decode_shortlist(order.decode, query, pending, skip)
    if big(colocated):
        colocated = prefill_shortlist(order.colocated, order.by_id, query, pending, skip)
    return prefill, decode, colocated


def _decision(
    snapshot: PoolSnapshot,
    policy: RoutingPolicy,
    prefill: Pick | None,
    decode: Pick,
    cached: int,
    choice: PrefillChoice | None = None,
    inputs: PrefillInputs | None = None,
) -> Decision:
    return Decision(
        pool=snapshot.pool,
        policy=policy.name,
        prefill=prefill.worker if prefill is not None else None,
        decode=decode.worker,
        predicted_cached_tokens=cached,
        prefill_scores=prefill.scores if prefill is not None else (),
        decode_scores=decode.scores,
        prefill_choice=choice,
        prefill_inputs=inputs,
    )
