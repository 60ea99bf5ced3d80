"""Pair-group metrics in a worker's Prometheus registry (:class:`common.metrics.Metrics`).

``kv_pair_groups_open`` (gauge), ``kv_pair_group_setups_total``,
``kv_pair_group_setup_seconds`` (histogram, :data:`~kv_transfer.metrics.SETUP_BUCKETS`)
and ``kv_pair_group_teardowns_total{reason}`` — reasons ``evicted`` (the budget's LRU),
``idle`` (``idle_timeout_s``), ``peer_closed`` (the peer dropped its side), ``error``,
``setup_failed``, ``closed`` (shutdown) — each labelled with the endpoint's ``role``.
"""

from __future__ import annotations

from common.metrics import Metrics
from kv_transfer.budget import PairBudget
from kv_transfer.metrics import SETUP_BUCKETS, GroupStats


class _PrometheusGroups:
    def __init__(self, metrics: Metrics, role: str) -> None:
        self._open = metrics.gauge("kv_pair_groups_open", "KV pair groups open", ["role"]).labels(
            role
        )
        self._setups = metrics.counter(
            "kv_pair_group_setups", "KV pair groups built", ["role"]
        ).labels(role)
        self._setup_s = metrics.histogram(
            "kv_pair_group_setup_seconds", "Time to build a KV pair group", ["role"], SETUP_BUCKETS
        ).labels(role)
        self._teardowns = metrics.counter(
            "kv_pair_group_teardowns", "KV pair groups torn down", ["role", "reason"]
        )
        self._role = role

    def opened(self, open_now: int) -> None:
        self._open.set(open_now)

    def set_up(self, seconds: float) -> None:
        self._setups.inc()
        self._setup_s.observe(seconds)

    def torn_down(self, reason: str, open_now: int) -> None:
        self._teardowns.labels(self._role, reason).inc()
        self._open.set(open_now)


def prometheus_budget(metrics: Metrics, role: str, cap: int) -> PairBudget:
    """A pair budget of ``cap`` groups whose events land in ``metrics``."""
    return PairBudget(cap, GroupStats(sink=_PrometheusGroups(metrics, role)))
