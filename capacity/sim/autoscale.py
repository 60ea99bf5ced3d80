"""Autoscaling: the real ``deploy.autoscaling`` policies, fed simulated metrics, with
Serve's look-back, delays, factors and bounds around them.

Per autoscaled pool, every ``metrics_interval_s`` of simulated time:

1. each live replica reports what ``deploy.worker_host`` records with
   ``record_autoscaling_stats()``: prefill ``ttft_p90_ms`` (worker arrival → first token,
   last ``latency_window_s``) and ``queued_prefill_tokens``; decode ``itl_p90_ms`` (p90 of
   the requests' mean inter-token gaps that finished in the window) and ``kv_block_use``;
   both ``queue_time_p90_ms`` (admission-queue wait) when they have samples;
2. Serve averages each replica's reports over ``look_back_period_s``
   (``aggregated_metrics``);
3. the policy named by ``policy_function`` (imported, e.g. ``deploy.autoscaling:
   prefill_policy``) returns the replicas it wants from an :class:`AutoscalingContext`
   with the attributes the real one has and the policy reads;
4. as Serve does, a new count is applied only once decisions in the same direction have
   held ``upscale_delay_s`` / ``downscale_delay_s``, damped by ``upscaling_factor`` /
   ``downscaling_factor`` and clamped to ``[min_replicas, max_replicas]``.

A new replica serves ``replica_startup_s`` after the decision (SimOptions). Scale-down
drains the newest replicas: the router stops sending them work (they leave the snapshot)
and they go once their requests have finished.
"""

from __future__ import annotations

import importlib
import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from capacity.sim.config import PoolSpec
from capacity.sim.result import PoolUse
from common.worker_info import WorkerRole
from deploy.scaling import (
    ITL_P90_MS,
    KV_BLOCK_USE,
    QUEUE_TIME_P90_MS,
    QUEUED_PREFILL_TOKENS,
    TTFT_P90_MS,
)

if TYPE_CHECKING:
    from capacity.sim.cluster import Cluster
    from capacity.sim.replica import EngineReplica


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    policy_kwargs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DeploymentConfig:
    policy: PolicyConfig


@dataclass(frozen=True, slots=True)
class AutoscalingContext:
    """The attributes of Serve's AutoscalingContext that pdserve's policies read."""

    aggregated_metrics: dict[str, dict[str, float]]
    current_num_replicas: int
    target_num_replicas: int
    capacity_adjusted_min_replicas: int
    capacity_adjusted_max_replicas: int
    config: DeploymentConfig
    policy_state: dict[str, Any] = field(default_factory=dict)


def _p90(samples: list[tuple[float, float]], since: float) -> float | None:
    values = sorted(v for t, v in samples if t >= since)
    if not values:
        return None
    return values[min(len(values) - 1, math.ceil(0.9 * len(values)) - 1)]


class PoolScaler:
    """One autoscaled role: its reports, its pending decision, its target."""

    def __init__(self, cluster: Cluster, spec: PoolSpec) -> None:
        assert spec.autoscale is not None
        self.cluster = cluster
        self.spec = spec
        self.auto = spec.autoscale
        module, _, name = self.auto.policy_function.partition(":")
        self.policy = getattr(importlib.import_module(module), name)
        self.target = spec.replicas
        self.reports: dict[str, deque[tuple[float, dict[str, float]]]] = {}
        self._direction = 0
        self._since = 0.0
        self.state: dict[str, Any] = {}
        self.starting = 0
        self.ticks = [0]  # ticks queued, all pools (shared): are only ticks left to run?

    def schedule(self, t: float) -> None:
        self.ticks[0] += 1
        self.cluster.loop.at(t, self.tick)

    def tick(self, _: Any = None) -> None:
        self.ticks[0] -= 1
        cluster, now = self.cluster, self.cluster.loop.now
        live = cluster.live(self.spec.role)
        for replica in live:
            self._report(replica, now)
        metrics = self._aggregated(live, now)
        ctx = AutoscalingContext(
            metrics,
            len(live),
            self.target,
            self.auto.min_replicas,
            self.auto.max_replicas,
            DeploymentConfig(PolicyConfig(self.auto.policy_kwargs)),
            self.state,
        )
        wanted, self.state = self.policy(ctx)
        self._decide(int(wanted), len(live) + self.starting, now)
        # Ticks stop with the traffic, or when only ticks are left to run (else forever).
        if cluster.open_requests and len(cluster.loop) > self.ticks[0]:
            self.schedule(now + self.auto.metrics_interval_s)

    def _report(self, replica: EngineReplica, now: float) -> None:
        cluster = self.cluster
        window = now - cluster.config.latency_window_s
        wid = replica.worker_id
        report: dict[str, float] = {}
        queue = _p90(cluster.queue_samples.get(wid, []), window)
        if queue is not None:
            report[QUEUE_TIME_P90_MS] = queue * 1e3
        if replica.role is WorkerRole.PREFILL:
            ttft = _p90(cluster.ttft_samples.get(wid, []), window)
            if ttft is not None:
                report[TTFT_P90_MS] = ttft * 1e3
            report[QUEUED_PREFILL_TOKENS] = max(replica.queued_prefill_tokens, 0)
        else:
            itl = _p90(cluster.itl_samples.get(wid, []), window)
            if itl is not None:
                report[ITL_P90_MS] = itl * 1e3
            report[KV_BLOCK_USE] = replica.blocks.num_used_blocks / replica.blocks.num_blocks
            ttft = _p90(cluster.ttft_samples.get(wid, []), window)
            if ttft is not None and replica.role is WorkerRole.COLOCATED:
                report[TTFT_P90_MS] = ttft * 1e3
            report.setdefault(QUEUED_PREFILL_TOKENS, max(replica.queued_prefill_tokens, 0))
        reports = self.reports.setdefault(wid, deque())
        reports.append((now, report))
        while reports and reports[0][0] < now - self.auto.look_back_period_s:
            reports.popleft()

    def _aggregated(self, live: list[EngineReplica], now: float) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for replica in live:
            sums: dict[str, list[float]] = {}
            for _, report in self.reports.get(replica.worker_id, ()):
                for name, value in report.items():
                    sums.setdefault(name, []).append(value)
            for name, values in sums.items():
                out.setdefault(name, {})[replica.worker_id] = sum(values) / len(values)
        return out

    def _decide(self, wanted: int, current: int, now: float) -> None:
        auto = self.auto
        wanted = max(auto.min_replicas, min(auto.max_replicas, wanted))
        direction = (wanted > current) - (wanted < current)
        if direction != self._direction:
            self._direction, self._since = direction, now
        if direction == 0:
            return
        delay = auto.upscale_delay_s if direction > 0 else auto.downscale_delay_s
        if now - self._since < delay:
            return
        factor = auto.upscaling_factor if direction > 0 else auto.downscaling_factor
        step = max(1, math.ceil(abs(wanted - current) * factor))
        self.target = current + direction * step
        self._direction, self._since = 0, now
        if direction > 0:
            for _ in range(step):
                self.starting += 1
                self.cluster.loop.at(now + self.cluster.options.replica_startup_s, self._up)
        else:
            self._down(step)

    def _up(self, _: Any = None) -> None:
        self.starting -= 1
        self.cluster.add_replica(self.spec.role)

    def _down(self, n: int) -> None:
        cluster = self.cluster
        victims = sorted(cluster.live(self.spec.role), key=lambda r: r.worker_id)[-n:]
        for replica in victims:
            replica.draining = True
            cluster.router.changed()
            if replica.assigned == 0 and not replica.waiting:
                cluster.remove_replica(replica)
            else:
                cluster._timeline(replica.role)


class Autoscaler:
    """The autoscaled pools of a cluster; also integrates replica-seconds per role."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.pools = [PoolScaler(cluster, s) for s in cluster.config.pools if s.autoscale]
        ticks = [0]
        for pool in self.pools:
            pool.ticks = ticks

    def start(self) -> None:
        for pool in self.pools:
            assert pool.auto is not None
            pool.schedule(pool.auto.metrics_interval_s)

    def account(self, end: float) -> None:
        """Fill the cluster's per-role utilisation (busy step time / replica time)."""
        cluster = self.cluster
        for role, replicas in cluster.by_role.items():
            for replica in replicas:
                cluster._account(replica)
            last: tuple[float, int] | None = None
            total = 0.0
            for t, _, name, count in cluster.timeline:
                if name != role.value:
                    continue
                if last is not None:
                    total += (min(t, end) - last[0]) * last[1]
                last = (t, count)
            if last is not None:
                total += max(end - last[0], 0.0) * last[1]
                cluster.use.setdefault(role.value, PoolUse()).replica_s = total
