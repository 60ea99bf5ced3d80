"""Routing policies: rank a pool's candidates for one request. They decide; they never call.

Every policy answers two questions over immutable inputs — the candidates
(:class:`~router.snapshot.WorkerView`), the request's :class:`RouteQuery` (sizes and the
prefix index's matches) and the router's :class:`~router.snapshot.Pending` bookkeeping:

- ``pick_prefill``: which prefill worker computes the prompt (in a colocated pool, which
  worker does everything);
- ``pick_decode``: which decode worker runs the request's decode.

``prefix_aware`` (the default) is the cost function of KV-aware routers, in prompt tokens:

    prefill cost(w) = tokens w must compute + load_weight (0.25) × prefill tokens queued on w
    decode  cost(w) = running batch of w + KV fraction in use on w  (+1e9 if the prompt
                      does not fit its free blocks)

Queued prefill tokens are the larger of the worker's last load report (less what this
router saw finish there after the report was taken: reports are up to a heartbeat old) and
what this router sent it and has not seen a first token for. Running batches likewise. The others
exist for comparison: ``round_robin``, ``random``, ``least_loaded`` (fewest requests).
Ties go to the worker this router has routed fewest requests to, then the smaller id, so
equal workers take turns. Policies hold at most a counter or an RNG; they are unit-tested
with hand-built snapshots.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from router.config import DEFAULT_LOAD_WEIGHT, Policy, PoolConfig
from router.snapshot import NO_PENDING, Pending, WorkerView

_NO_FIT_PENALTY = 1e9
# Decode costs (running batch + KV use) closer than this count as a tie, which goes to a
# decode worker the chosen prefill worker already holds a KV pair group with.
PAIR_TIE_MARGIN = 0.5


@dataclass(frozen=True, slots=True)
class RouteQuery:
    num_tokens: int  # prompt tokens
    max_tokens: int
    block_size: int
    matched_blocks: Mapping[str, int]  # worker id → leading prompt blocks it holds

    def cached_tokens(self, worker_id: str) -> int:
        """Prompt tokens ``worker_id`` should not have to compute (>= 1 is always computed)."""
        held = self.matched_blocks.get(worker_id, 0)
        return max(0, min(held * self.block_size, self.num_tokens - 1)) if held else 0

    @property
    def prompt_blocks(self) -> int:
        return -(-(self.num_tokens + 1) // self.block_size)


@dataclass(frozen=True, slots=True)
class Pick:
    worker: WorkerView
    cached_tokens: int  # what the prefix index predicts the worker has cached
    scores: tuple[tuple[str, float], ...]  # (worker id, cost) per candidate, for the log


class RoutingPolicy(Protocol):
    name: str

    def pick_prefill(
        self, candidates: Sequence[WorkerView], query: RouteQuery, pending: Mapping[str, Pending]
    ) -> Pick: ...

    def pick_decode(
        self, candidates: Sequence[WorkerView], query: RouteQuery, pending: Mapping[str, Pending]
    ) -> Pick: ...


def make_policy(pool: PoolConfig, seed: int | None = None) -> RoutingPolicy:
    if pool.policy is Policy.PREFIX_AWARE:
        return PrefixAware(pool.load_weight)
    if pool.policy is Policy.ROUND_ROBIN:
        return RoundRobin()
    if pool.policy is Policy.RANDOM:
        return RandomChoice(seed)
    return LeastLoaded()


# ---- load arithmetic shared by the policies ---------------------------------------------


def queued_prefill_tokens(worker: WorkerView, pending: Pending) -> int:
    """Prompt tokens queued on ``worker``: its report, less what finished since, or what
    this router knows it sent, whichever is larger."""
    load = worker.load
    if load is None:
        return pending.prefill_tokens
    reported = load.queued_prefill_tokens - pending.prefill_tokens_done_since(load.updated_at)
    return max(reported, pending.prefill_tokens, 0)


def batch_size(worker: WorkerView, pending: Pending) -> int:
    """Requests queued or running on ``worker``, by the same rule."""
    load = worker.load
    if load is None:
        return pending.requests
    reported = load.running + load.queued - pending.streams_done_since(load.updated_at)
    return max(reported, pending.requests, 0)


def kv_use(worker: WorkerView) -> float:
    """Fraction of the worker's KV blocks in use (0 without a load report)."""
    load = worker.load
    if load is None:
        return 0.0
    total = load.free_blocks + load.used_blocks
    return load.used_blocks / total if total else 1.0


def fits(worker: WorkerView, query: RouteQuery) -> bool:
    """Whether the prompt fits the worker's free blocks (unknown load: assume it does)."""
    return worker.load is None or worker.load.free_blocks >= query.prompt_blocks


def _argmin(
    candidates: Sequence[WorkerView],
    costs: Sequence[float],
    query: RouteQuery,
    pending: Mapping[str, Pending],
) -> Pick:
    if not candidates:
        raise ValueError("no candidates")

    best_key: tuple[float, int, int, str] | None = None
    worker = candidates[0]
    for candidate, cost in zip(candidates, costs, strict=True):
        p = pending.get(candidate.worker_id, NO_PENDING)
        key = (cost, p.requests, p.routed, candidate.worker_id)
        if best_key is None or key < best_key:
            best_key, worker = key, candidate
    scores = tuple(zip([c.worker_id for c in candidates], costs, strict=True))
    return Pick(worker, query.cached_tokens(worker.worker_id), scores)


# ---- the policies ------------------------------------------------------------------------


class PrefixAware:
    name = Policy.PREFIX_AWARE.value

    def __init__(self, load_weight: float = DEFAULT_LOAD_WEIGHT) -> None:
        self.load_weight = load_weight

    def pick_prefill(
        self, candidates: Sequence[WorkerView], query: RouteQuery, pending: Mapping[str, Pending]
    ) -> Pick:
        weight, cached = self.load_weight, query.cached_tokens
        costs = [
            query.num_tokens
            - cached(w.worker_id)
            + weight * queued_prefill_tokens(w, pending.get(w.worker_id, NO_PENDING))
            for w in candidates
        ]
        return _argmin(candidates, costs, query, pending)

    def pick_decode(
        self, candidates: Sequence[WorkerView], query: RouteQuery, pending: Mapping[str, Pending]
    ) -> Pick:
        costs = [
            batch_size(w, pending.get(w.worker_id, NO_PENDING))
            + kv_use(w)
            + (0.0 if fits(w, query) else _NO_FIT_PENALTY)
            for w in candidates
        ]
        return _argmin(candidates, costs, query, pending)


class LeastLoaded:
    name = Policy.LEAST_LOADED.value

    def pick_prefill(
        self, candidates: Sequence[WorkerView], query: RouteQuery, pending: Mapping[str, Pending]
    ) -> Pick:
        costs = [batch_size(w, pending.get(w.worker_id, NO_PENDING)) for w in candidates]
        return _argmin(candidates, costs, query, pending)

    pick_decode = pick_prefill


class RoundRobin:
    name = Policy.ROUND_ROBIN.value

    def __init__(self) -> None:
        self._turn = {"prefill": 0, "decode": 0}

    def _next(self, stage: str, candidates: Sequence[WorkerView], query: RouteQuery) -> Pick:
        if not candidates:
            raise ValueError("no candidates")
        worker = candidates[self._turn[stage] % len(candidates)]
        self._turn[stage] += 1
        return Pick(worker, query.cached_tokens(worker.worker_id), ())

    def pick_prefill(
        self, candidates: Sequence[WorkerView], query: RouteQuery, pending: Mapping[str, Pending]
    ) -> Pick:
        return self._next("prefill", candidates, query)

    def pick_decode(
        self, candidates: Sequence[WorkerView], query: RouteQuery, pending: Mapping[str, Pending]
    ) -> Pick:
        return self._next("decode", candidates, query)


class RandomChoice:
    name = Policy.RANDOM.value

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def pick_prefill(
        self, candidates: Sequence[WorkerView], query: RouteQuery, pending: Mapping[str, Pending]
    ) -> Pick:
        if not candidates:
            raise ValueError("no candidates")
        worker = self._rng.choice(candidates)
        return Pick(worker, query.cached_tokens(worker.worker_id), ())

    pick_decode = pick_prefill


# ---- tie-break: pairs that already hold a KV group ---------------------------------------


def prefer_paired(
    decode: Pick,
    candidates: Sequence[WorkerView],
    prefill: WorkerView,
    query: RouteQuery,
    margin: float = PAIR_TIE_MARGIN,
) -> Pick:
    """Among the decode candidates whose cost is within ``margin`` of the pick's, prefer
    one that ``prefill`` reports a KV pair group with (``WorkerLoad.kv_peers``): no group
    to build — milliseconds on gloo, ~100 MB of GPU memory and up to seconds on NCCL — and
    no budget eviction. Pure; the pick itself when there is no such tie."""
    peers = prefill.load.kv_peers if prefill.load is not None else ()
    if not peers or decode.worker.info.kv_address in peers:
        return decode
    costs = dict(decode.scores)
    limit = costs.get(decode.worker.worker_id, 0.0) + margin
    paired = [
        w
        for w in candidates
        if w.info.kv_address in peers and costs.get(w.worker_id, limit + 1.0) <= limit
    ]
    if not paired:
        return decode
    choice = min(paired, key=lambda w: (costs[w.worker_id], w.worker_id))
    return Pick(choice, query.cached_tokens(choice.worker_id), decode.scores)
