"""The pair-group budget: a cap, LRU eviction of idle groups, busy ones kept, metrics."""

from __future__ import annotations

import threading
import time

import pytest

from kv_transfer.budget import PairBudget
from kv_transfer.types import TransferConfig


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0  # every call is later: last-used order is call order
        return self.t


def _budget(cap: int) -> tuple[PairBudget, list[str]]:
    evicted: list[str] = []
    return PairBudget(cap, clock=Clock()), evicted


def test_under_the_cap_groups_are_admitted() -> None:
    budget, _ = _budget(2)
    assert budget.acquire("a", lambda: None, 0.0, wait=False)
    assert budget.acquire("b", lambda: None, 0.0, wait=False)
    assert len(budget) == 2 and budget.stats.snapshot().open == 2


def test_at_the_cap_the_least_recently_used_idle_group_is_evicted() -> None:
    budget, evicted = _budget(2)
    for key in ("a", "b"):
        budget.acquire(key, lambda k=key: evicted.append(k), 0.0, wait=False)
    budget.idle("a")
    budget.idle("b")
    budget.busy("a")  # a was used after b
    budget.idle("a")
    assert budget.acquire("c", lambda: None, 0.0, wait=False)
    assert evicted == ["b"]
    budget.release("b", "evicted")
    snap = budget.stats.snapshot()
    assert snap.open == 2 and snap.teardowns == {"evicted": 1}
    assert set(budget.holders()) == {"a", "c"}


def test_a_group_with_a_transfer_in_flight_is_never_evicted() -> None:
    budget, evicted = _budget(1)
    budget.acquire(
        "a", lambda: evicted.append("a"), 0.0, wait=False
    )  # busy: admitted for a transfer
    assert not budget.acquire("b", lambda: None, 0.0, wait=False)
    assert evicted == [] and budget.holders() == ("a",)


def test_a_waiting_acquire_gets_the_slot_once_the_victim_is_gone() -> None:
    budget = PairBudget(1)
    budget.acquire("a", lambda: threading.Timer(0.05, budget.release, ("a", "evicted")).start(), 0)
    budget.idle("a")
    start = time.monotonic()
    assert budget.acquire("b", lambda: None, time.monotonic() + 2.0)
    assert 0.04 <= time.monotonic() - start < 1.0
    assert budget.holders() == ("b",)


def test_a_waiting_acquire_gives_up_at_its_deadline_when_all_are_busy() -> None:
    budget = PairBudget(1)
    budget.acquire("a", lambda: None, 0.0)
    start = time.monotonic()
    assert not budget.acquire("b", lambda: None, time.monotonic() + 0.1)
    assert time.monotonic() - start < 1.0


def test_no_cap_and_setup_histogram() -> None:
    budget = PairBudget(0)
    for i in range(100):
        assert budget.acquire(i, lambda: None, 0.0, wait=False)
    budget.stats.setup(0.002)
    budget.stats.setup(2.0)
    snap = budget.stats.snapshot()
    assert snap.open == 100 and snap.setups == 2 and snap.setup_sum == pytest.approx(2.002)
    assert snap.setup_counts[0] == 0 and snap.setup_counts[1] == 1 and snap.setup_counts[-1] == 2


def test_config_validates_the_budget_and_timeouts() -> None:
    assert TransferConfig().max_pair_groups == 64
    with pytest.raises(ValueError, match="max_pair_groups"):
        TransferConfig(max_pair_groups=-1)
    with pytest.raises(ValueError, match="idle_timeout_s"):
        TransferConfig(idle_timeout_s=700.0, group_timeout_s=600.0)


def test_worker_yaml_and_cli_set_the_cap() -> None:
    from common.worker_info import WorkerRole
    from worker.config import WorkerConfig, build_parser, parse_config

    cfg = WorkerConfig.from_mapping(
        {"role": "prefill", "kv_transfer": {"max_pair_groups": 8, "idle_timeout_s": 60}}
    )
    assert cfg.kv_transfer.max_pair_groups == 8 and cfg.kv_transfer.idle_timeout_s == 60
    args = ["--kv-max-pair-groups", "3"]
    parsed = parse_config(build_parser("w", "test"), args, WorkerRole.PREFILL)
    assert parsed.kv_transfer.max_pair_groups == 3
    with pytest.raises(ValueError, match="max_pair_groups"):
        WorkerConfig.from_mapping({"role": "prefill", "kv_transfer": {"max_pair_groups": -2}})


def test_group_events_reach_prometheus() -> None:
    from common.metrics import Metrics
    from kv_transfer.prometheus import prometheus_budget

    metrics = Metrics()
    budget = prometheus_budget(metrics, "sender", 1)
    budget.acquire("a", lambda: budget.release("a", "evicted"), 0.0, wait=False)
    budget.stats.setup(0.003)
    budget.idle("a")
    budget.acquire("b", lambda: None, 0.0, wait=False)  # evicts a
    text = metrics.render().decode()
    assert 'pdserve_kv_pair_groups_open{role="sender"} 1.0' in text
    assert 'pdserve_kv_pair_group_setups_total{role="sender"} 1.0' in text
    assert 'pdserve_kv_pair_group_teardowns_total{reason="evicted",role="sender"} 1.0' in text
    assert 'pdserve_kv_pair_group_setup_seconds_bucket{le="0.005",role="sender"} 1.0' in text
