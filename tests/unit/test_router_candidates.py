"""Shortlists in big pools: the same pick as scoring every worker, at a fraction of the work."""

from __future__ import annotations

import random

import pytest

from common.errors import ErrorCode, RequestError
from common.worker_info import BlockGeometry, WorkerInfo, WorkerLoad, WorkerRole
from router.candidates import NARROW_ABOVE, QUIET, load_order
from router.policies import PrefixAware, RoundRobin, RouteQuery
from router.routing import Decision, decide
from router.snapshot import Pending, PoolSnapshot, WorkerView

BS = 16


def view(worker_id: str, role: WorkerRole, rng: random.Random, *, idle: bool = False) -> WorkerView:
    geometry = BlockGeometry("m", "float32", BS, 30, 3, 64, 4096)
    info = WorkerInfo(worker_id, role, "p", "m", "10.0.0.1:1", None, geometry)
    load = WorkerLoad(
        worker_id,
        queued=0 if idle else rng.randrange(4),
        running=0 if idle else rng.randrange(16),
        free_blocks=rng.randrange(0, 400),
        used_blocks=rng.randrange(400),
        cached_blocks=0,
        queued_prefill_tokens=0 if idle else rng.randrange(4000),
    )
    return WorkerView(info, load)


def pool(n: int, rng: random.Random, *, idle: bool = False) -> tuple[PoolSnapshot, PoolSnapshot]:
    """The same workers with a load order (shortlists) and without (score everyone)."""
    prefill = tuple(view(f"p{i:03d}", WorkerRole.PREFILL, rng, idle=idle) for i in range(n))
    decode = tuple(view(f"d{i:03d}", WorkerRole.DECODE, rng, idle=idle) for i in range(n))
    full = PoolSnapshot("p", prefill, decode)
    return PoolSnapshot("p", prefill, decode, order=load_order(prefill, decode, (), 7)), full


def pending_for(snapshot: PoolSnapshot, rng: random.Random) -> dict[str, Pending]:
    pending = {}
    for w in snapshot.prefill:
        if rng.random() < 0.2:
            pending[w.worker_id] = Pending(prefill_tokens=rng.randrange(1, 3000), routed=3)
    for w in snapshot.decode:
        if rng.random() < 0.3:
            pending[w.worker_id] = Pending(requests=rng.randrange(20), routed=5)
    return pending


def cost_of(decision: Decision, worker_id: str, stage: str) -> float:
    scores = decision.prefill_scores if stage == "prefill" else decision.decode_scores
    return dict(scores)[worker_id]


def test_a_shortlist_picks_a_worker_as_cheap_as_scoring_the_whole_pool() -> None:
    rng = random.Random(3)
    short, full = pool(300, rng)
    policy = PrefixAware()
    for _ in range(200):
        pending = pending_for(full, rng)
        matched = {f"p{rng.randrange(300):03d}": rng.randrange(1, 40) for _ in range(3)}
        q = RouteQuery(rng.randrange(64, 2048), 16, BS, matched)
        avoid = frozenset(f"p{rng.randrange(300):03d}" for _ in range(rng.randrange(3)))
        fast = decide(short, policy, q, pending, avoid=avoid)
        slow = decide(full, policy, q, pending, avoid=avoid)
        assert len(fast.prefill_scores) < 60 and len(fast.decode_scores) < 120
        assert fast.prefill is not None and slow.prefill is not None
        assert fast.prefill.worker_id not in avoid
        best_prefill = cost_of(slow, slow.prefill.worker_id, "prefill")
        assert cost_of(slow, fast.prefill.worker_id, "prefill") == best_prefill
        best_decode = cost_of(slow, slow.decode.worker_id, "decode")
        assert cost_of(slow, fast.decode.worker_id, "decode") == best_decode


def test_a_burst_between_refreshes_spreads_instead_of_piling_on() -> None:
    rng = random.Random(5)
    short, _ = pool(200, rng, idle=True)  # every worker reports an empty queue
    pending: dict[str, Pending] = {}
    chosen = set()
    for _ in range(3 * QUIET):  # requests in flight: none has its first token yet
        decision = decide(short, PrefixAware(), RouteQuery(512, 16, BS, {}), pending)
        assert decision.prefill is not None
        worker_id = decision.prefill.worker_id
        assert worker_id not in chosen
        chosen.add(worker_id)
        pending[worker_id] = Pending(prefill_tokens=512, routed=1)


def test_refused_and_quarantined_workers_deep_in_the_order_are_still_honoured() -> None:
    rng = random.Random(8)
    short, _ = pool(NARROW_ABOVE + 40, rng)
    everyone_but_last = frozenset(w.worker_id for w in short.order.decode[:-1])  # type: ignore[union-attr]
    decision = decide(
        short, PrefixAware(), RouteQuery(64, 16, BS, {}), {}, refused=everyone_but_last
    )
    assert decision.decode.worker_id == short.order.decode[-1].worker_id  # type: ignore[union-attr]
    everyone = frozenset(w.worker_id for w in short.decode)
    with pytest.raises(RequestError) as err:
        decide(short, PrefixAware(), RouteQuery(64, 16, BS, {}), {}, refused=everyone)
    assert err.value.code is ErrorCode.RESOURCE_EXHAUSTED
    quarantined = frozenset(w.worker_id for w in short.order.prefill[:-1])  # type: ignore[union-attr]
    decision = decide(short, PrefixAware(), RouteQuery(64, 16, BS, {}), {}, quarantined=quarantined)
    assert decision.prefill is not None and decision.prefill.worker_id not in quarantined


def test_small_pools_and_other_policies_score_every_worker() -> None:
    rng = random.Random(9)
    short, _ = pool(NARROW_ABOVE, rng)
    decision = decide(short, PrefixAware(), RouteQuery(64, 16, BS, {}), {})
    assert len(decision.prefill_scores) == NARROW_ABOVE
    big, _ = pool(NARROW_ABOVE + 1, rng)
    turns = RoundRobin()
    picked = {
        decide(big, turns, RouteQuery(64, 16, BS, {}), {}).prefill.worker_id  # type: ignore[union-attr]
        for _ in range(NARROW_ABOVE + 1)
    }
    assert len(picked) == NARROW_ABOVE + 1  # round robin still visits the whole pool


def test_the_load_order_sorts_by_report_and_reshuffles_ties_per_refresh() -> None:
    rng = random.Random(10)
    prefill = [view(f"p{i}", WorkerRole.PREFILL, rng, idle=True) for i in range(50)]
    decode = [view(f"d{i}", WorkerRole.DECODE, rng) for i in range(50)]
    first, second = (load_order(prefill, decode, (), epoch) for epoch in (1, 2))
    assert [w.worker_id for w in first.prefill] != [w.worker_id for w in second.prefill]
    reported = [w.load.running + w.load.queued for w in first.decode]  # type: ignore[union-attr]
    assert reported == sorted(reported)
    assert set(first.by_id) == {w.worker_id for w in prefill + decode}
