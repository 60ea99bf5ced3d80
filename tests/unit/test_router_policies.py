"""Routing policies and decide(): pure functions over hand-built snapshots, no servers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from common.errors import ErrorCode, RequestError
from common.worker_info import BlockGeometry, WorkerInfo, WorkerLoad, WorkerRole
from router.config import Policy, PoolConfig
from router.policies import (
    LeastLoaded,
    PrefixAware,
    RandomChoice,
    RoundRobin,
    RouteQuery,
    make_policy,
)
from router.routing import decide
from router.snapshot import Pending, PoolSnapshot, WorkerView
from router.tracker import WorkerTracker

BS = 16


def worker(
    worker_id: str,
    role: WorkerRole = WorkerRole.PREFILL,
    *,
    queued: int = 0,
    running: int = 0,
    free: int = 100,
    used: int = 0,
    queued_tokens: int = 0,
    load: bool = True,
) -> WorkerView:
    geometry = BlockGeometry("m", "float32", BS, 30, 3, 64, 128)
    info = WorkerInfo(
        worker_id, role, "p", "m", f"127.0.0.1:{hash(worker_id) % 1000 + 1}", None, geometry
    )
    report = WorkerLoad(
        worker_id,
        queued=queued,
        running=running,
        free_blocks=free,
        used_blocks=used,
        cached_blocks=0,
        queued_prefill_tokens=queued_tokens,
    )
    return WorkerView(info, report if load else None)


def query(tokens: int = 320, matched: dict[str, int] | None = None, max_tokens: int = 16):
    return RouteQuery(tokens, max_tokens, BS, matched or {})


# ---- prefix-aware -----------------------------------------------------------------------------


def test_prefix_aware_prefers_the_worker_holding_the_prefix() -> None:
    a, b = worker("a"), worker("b")
    pick = PrefixAware().pick_prefill([a, b], query(320, {"b": 18}), {})
    assert pick.worker.worker_id == "b"
    assert pick.cached_tokens == 288
    assert dict(pick.scores) == {"a": 320.0, "b": 32.0}


def test_prefix_aware_trades_cache_hits_against_queued_work() -> None:
    a = worker("a")
    b = worker("b", queued_tokens=1000)  # b holds the prefix but has a long queue
    pick = PrefixAware(load_weight=1.0).pick_prefill([a, b], query(320, {"b": 18}), {})
    assert pick.worker.worker_id == "a"
    # With load ignored, the cache wins.
    assert PrefixAware(0.0).pick_prefill([a, b], query(320, {"b": 18}), {}).worker.worker_id == "b"


def test_prefix_aware_counts_the_routers_own_pending_prompts() -> None:
    # The load reports are stale (zero); the router knows it just sent b 2000 tokens.
    a, b = worker("a"), worker("b")
    pending = {"b": Pending(requests=1, prefill_tokens=2000, routed=1)}
    assert PrefixAware().pick_prefill([a, b], query(320, {"b": 18}), pending).worker is a


def test_cached_tokens_leave_one_token_to_compute() -> None:
    q = query(32, {"a": 2})
    assert q.cached_tokens("a") == 31
    assert q.cached_tokens("b") == 0


def test_a_report_older_than_a_completion_does_not_count_it() -> None:
    # b's last report (t=100) still shows the 300-token prompt that finished at t=100.2.
    a = worker("a")
    b = worker("b", queued_tokens=300)
    b = WorkerView(b.info, replace(b.load, updated_at=100.0))
    stale = {"b": Pending(routed=1, prefills_done=((100.2, 300),))}
    policy = PrefixAware(load_weight=1.0)
    assert policy.pick_prefill([a, b], query(320, {"b": 18}), stale).worker is b
    fresh = {"b": Pending(routed=1, prefills_done=((99.0, 300),))}  # in the report: counts
    assert policy.pick_prefill([a, b], query(320, {"b": 18}), fresh).worker is a
    d = worker("d", WorkerRole.DECODE, running=3)
    d = WorkerView(d.info, replace(d.load, updated_at=100.0))
    e = worker("e", WorkerRole.DECODE, running=1)
    done = {"d": Pending(streams_done=(100.1, 100.2, 100.3))}
    assert PrefixAware().pick_decode([d, e], query(), done).worker is d


def test_ties_spread_by_routed_count_then_id() -> None:
    a, b, c = worker("a"), worker("b"), worker("c")
    policy = PrefixAware()
    assert policy.pick_prefill([a, b, c], query(), {}).worker is a
    pending = {"a": Pending(routed=1), "b": Pending(routed=1)}
    assert policy.pick_prefill([a, b, c], query(), pending).worker is c


def test_decode_prefers_small_batches_then_free_kv() -> None:
    busy = worker("busy", WorkerRole.DECODE, running=8)
    full = worker("full", WorkerRole.DECODE, running=1, free=30, used=70)
    roomy = worker("roomy", WorkerRole.DECODE, running=1, free=90, used=10)
    pick = PrefixAware().pick_decode([busy, full, roomy], query(), {})
    assert pick.worker is roomy
    assert dict(pick.scores)["busy"] == pytest.approx(8.0)
    assert dict(pick.scores)["full"] == pytest.approx(1.7)


def test_decode_avoids_workers_the_prompt_does_not_fit() -> None:
    tiny = worker("tiny", WorkerRole.DECODE, free=3)  # 320-token prompt needs 21 blocks
    loaded = worker("loaded", WorkerRole.DECODE, running=20, free=50)
    assert PrefixAware().pick_decode([tiny, loaded], query(320), {}).worker is loaded


def test_decode_counts_open_streams_when_reports_lag() -> None:
    a = worker("a", WorkerRole.DECODE)
    b = worker("b", WorkerRole.DECODE)
    pending = {"a": Pending(requests=3)}
    assert PrefixAware().pick_decode([a, b], query(), pending).worker is b


def test_unknown_load_is_treated_as_idle() -> None:
    fresh = worker("fresh", load=False)
    busy = worker("busy", queued_tokens=50)
    assert PrefixAware().pick_prefill([busy, fresh], query(), {}).worker is fresh


# ---- the comparison policies --------------------------------------------------------------------


def test_round_robin_cycles_each_stage() -> None:
    a, b, c = worker("a"), worker("b"), worker("c")
    rr = RoundRobin()
    picks = [rr.pick_prefill([a, b, c], query(), {}).worker.worker_id for _ in range(4)]
    assert picks == ["a", "b", "c", "a"]
    assert rr.pick_decode([a, b], query(), {}).worker is a


def test_random_is_seeded_and_covers_the_candidates() -> None:
    ws = [worker(str(i)) for i in range(4)]
    first = [RandomChoice(7).pick_prefill(ws, query(), {}).worker.worker_id for _ in range(1)]
    again = [RandomChoice(7).pick_prefill(ws, query(), {}).worker.worker_id for _ in range(1)]
    assert first == again
    rnd = RandomChoice(1)
    seen = {rnd.pick_decode(ws, query(), {}).worker.worker_id for _ in range(100)}
    assert seen == {"0", "1", "2", "3"}


def test_least_loaded_counts_requests_and_ignores_the_cache() -> None:
    a = worker("a", running=2)
    b = worker("b", running=1, queued=0)
    pick = LeastLoaded().pick_prefill([a, b], query(320, {"a": 19}), {})
    assert pick.worker is b and pick.cached_tokens == 0
    assert LeastLoaded().pick_decode([a, b], query(), {"b": Pending(requests=5)}).worker is a


def test_make_policy_follows_the_pool_config() -> None:
    kinds = {
        Policy.PREFIX_AWARE: PrefixAware,
        Policy.ROUND_ROBIN: RoundRobin,
        Policy.RANDOM: RandomChoice,
        Policy.LEAST_LOADED: LeastLoaded,
    }
    for policy, kind in kinds.items():
        made = make_policy(PoolConfig("p", policy=policy))
        assert isinstance(made, kind) and made.name == policy.value


# ---- decide(): pool shapes and failures -------------------------------------------------------


def snapshot(*workers: WorkerView) -> PoolSnapshot:
    def of(role: WorkerRole) -> tuple[WorkerView, ...]:
        return tuple(w for w in workers if w.info.role is role)

    return PoolSnapshot(
        "p", of(WorkerRole.PREFILL), of(WorkerRole.DECODE), of(WorkerRole.COLOCATED)
    )


def test_disaggregated_decision_names_both_workers() -> None:
    snap = snapshot(worker("p0"), worker("p1"), worker("d0", WorkerRole.DECODE))
    decision = decide(snap, PrefixAware(), query(320, {"p1": 10}), {})
    assert decision.prefill_worker_id == "p1" and decision.decode.worker_id == "d0"
    assert decision.predicted_cached_tokens == 160 and decision.policy == "prefix_aware"


def test_colocated_pool_uses_one_worker_ranked_by_prefix() -> None:
    snap = snapshot(worker("c0", WorkerRole.COLOCATED), worker("c1", WorkerRole.COLOCATED))
    decision = decide(snap, PrefixAware(), query(320, {"c1": 5}), {})
    assert decision.prefill is None and decision.decode.worker_id == "c1"
    assert decision.predicted_cached_tokens == 80


def test_decode_only_pool_prefills_locally() -> None:
    decision = decide(snapshot(worker("d0", WorkerRole.DECODE)), PrefixAware(), query(), {})
    assert decision.prefill is None and decision.decode.worker_id == "d0"


def test_no_live_worker_is_unavailable() -> None:
    with pytest.raises(RequestError) as err:
        decide(PoolSnapshot("p"), PrefixAware(), query(), {})
    assert err.value.code is ErrorCode.UNAVAILABLE
    with pytest.raises(RequestError) as err:
        decide(snapshot(worker("p0")), PrefixAware(), query(), {})
    assert err.value.code is ErrorCode.UNAVAILABLE and "decode" in err.value.message


def test_refused_decode_workers_are_never_retried() -> None:
    snap = snapshot(worker("p0"), worker("d0", WorkerRole.DECODE), worker("d1", WorkerRole.DECODE))
    decision = decide(snap, PrefixAware(), query(), {}, refused=frozenset({"d0"}))
    assert decision.decode.worker_id == "d1"
    with pytest.raises(RequestError) as err:
        decide(snap, PrefixAware(), query(), {}, refused=frozenset({"d0", "d1"}))
    assert err.value.code is ErrorCode.RESOURCE_EXHAUSTED


def test_avoid_and_quarantine_are_soft() -> None:
    snap = snapshot(worker("p0"), worker("p1"), worker("d0", WorkerRole.DECODE))
    q = query(320, {"p0": 19})
    assert decide(snap, PrefixAware(), q, {}, avoid=frozenset({"p0"})).prefill_worker_id == "p1"
    decision = decide(snap, PrefixAware(), q, {}, quarantined=frozenset({"p0"}))
    assert decision.prefill_worker_id == "p1"
    # Nothing else left: the avoided worker is still used (better than failing).
    everything = frozenset({"p0", "p1", "d0"})
    decision = decide(snap, PrefixAware(), q, {}, avoid=everything)
    assert decision.prefill_worker_id == "p0" and decision.decode.worker_id == "d0"


# ---- the tracker that feeds Pending -------------------------------------------------------------


def test_tracker_counts_prefill_tokens_until_the_first_token() -> None:
    wall = [1000.0]
    tracker = WorkerTracker(wall_clock=lambda: wall[0])
    ticket = tracker.open("p0", "d0", 300)
    assert tracker.pending["p0"] == Pending(requests=0, prefill_tokens=300, routed=1)
    assert tracker.pending["d0"] == Pending(requests=1, prefill_tokens=0, routed=1)
    tracker.first_token(ticket)
    tracker.first_token(ticket)
    assert tracker.pending["p0"].prefill_tokens == 0
    assert tracker.pending["p0"].prefills_done == ((1000.0, 300),)
    wall[0] = 1001.0
    tracker.close(ticket)
    tracker.close(ticket)
    assert tracker.pending["d0"].requests == 0
    assert tracker.pending["d0"].streams_done == (1001.0,)
    local = tracker.open(None, "c0", 50)
    assert tracker.pending["c0"] == Pending(requests=1, prefill_tokens=50, routed=1)
    tracker.close(local)  # closing before the first token also releases the prompt
    c0 = tracker.pending["c0"]
    assert (c0.requests, c0.prefill_tokens, c0.prefills_done) == (0, 0, ((1001.0, 50),))
    wall[0] = 1010.0  # the completion log keeps a few seconds
    tracker.first_token(tracker.open("p0", "d0", 10))
    assert tracker.pending["p0"].prefills_done == ((1010.0, 10),)
    tracker.retain({"p0"})
    assert set(tracker.pending) == {"p0", "d0"}  # d0 still has an open stream


def test_tracker_quarantine_expires() -> None:
    now = [0.0]
    tracker = WorkerTracker(quarantine_s=5, clock=lambda: now[0])
    tracker.quarantine("a")
    assert tracker.quarantined() == {"a"}
    now[0] = 6
    assert tracker.quarantined() == set()
