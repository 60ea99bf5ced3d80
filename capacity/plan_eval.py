"""The planner's mechanism: one candidate at one rate → one simulation → an Outcome.

:class:`SimEvaluator` is the ``evaluate`` function :func:`capacity.plan.plan` searches
with. It writes the candidate into the base Serve YAML (:mod:`capacity.serve_yaml`, the
same file the plan ships), reads it back with the simulator's own loader
(``sim_config_from_serve``), generates the traffic's requests (seeded, cached per rate) and
runs :func:`capacity.sim.simulate` with a fixed seed, so a candidate always gets the same
answer.

Sub-fleet approximation (``fleet_scale`` < 1, for fleets too big to simulate whole many
times): a candidate with ``n`` replicas in a pool is simulated with ``max(1, floor(n ×
fleet_scale))`` replicas at ``fleet_scale`` × the rate, so each simulated replica carries
exactly the load of a real one at the counts the search settles on (the smallest ``n`` for
a feasible sub-count ``k`` is ``k / fleet_scale``). What it cannot model: effects that
depend on the pool's absolute size (prefix-cache hit spread over more replicas, routing
choice among more candidates). benchmarks/capacity_scale.py measures its error.

Stopping early (``stop_early=True``, what ``pdserve plan`` and the planner benchmark use):
a simulation at the traffic's own rate (multiplier 1: the search's feasibility probes)
stops as soon as more requests have certainly missed the SLO than its attainment allows
(:func:`miss_limit`: one more and even if every other request met it, attainment would be
below the target) — refused, a first token over the TTFT bound, or finished over a bound.
Such a candidate misses the SLO either way, so ``meets`` and hence the search, the chosen
configuration and the ranked table are the same as with whole runs; its Outcome says where
it stopped (``stopped_s``) and its figures are partial (attainment: a lower bound). Curve
points at other rates always run whole (curves are drawn for feasible candidates only, so
their multiplier-1 point was never stopped).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from capacity.plan_types import Autoscale, Candidate, Outcome, Slo
from capacity.profile import Profile
from capacity.serve_yaml import candidate_config
from capacity.traffic import Traffic, generate
from loadgen.summary import Slo as RecordSlo
from loadgen.summary import percentile


class SimEvaluator:
    """``evaluate(candidate, multiplier)`` by simulation (see the module doc)."""

    def __init__(
        self,
        traffic: Traffic,
        profile: Profile,
        slo: Slo,
        base: str | Path,
        *,
        seed: int = 0,
        fleet_scale: float = 1.0,
        stop_early: bool = False,
    ) -> None:
        if not 0 < fleet_scale <= 1:
            raise ValueError("fleet_scale must be in (0, 1]")
        self.traffic, self.profile, self.slo, self.base = traffic, profile, slo, Path(base)
        self.seed, self.fleet_scale, self.stop_early = seed, fleet_scale, stop_early
        self._record_slo = RecordSlo(ttft_ms=slo.ttft_s * 1e3, tpot_ms=slo.tpot_s * 1e3)
        self._requests: dict[float, list[Any]] = {}
        self._cache: dict[tuple[Candidate, float], Outcome] = {}

    @property
    def until_s(self) -> float:
        """Where a simulation stops: the traffic plus a drain of a quarter of it (at least
        a minute). A request still unfinished then counts as missing the SLO: an
        overloaded candidate's backlog is not simulated to its end."""
        return self.traffic.duration_s + max(60.0, self.traffic.duration_s / 4)

    def requests(self, multiplier: float) -> list[Any]:
        """The (sub-fleet-scaled) requests at ``multiplier`` × the rate; cached."""
        if multiplier not in self._requests:
            scaled = self.traffic.scaled(multiplier * self.fleet_scale)
            self._requests[multiplier] = generate(scaled, seed=self.seed)
        return self._requests[multiplier]

    def simulated(self, candidate: Candidate) -> Candidate:
        """The candidate the simulator runs: the sub-fleet's share of each pool."""
        if self.fleet_scale == 1.0:
            return candidate
        return replace(
            candidate,
            prefill=self._shrink(candidate.prefill),
            decode=self._shrink(candidate.decode) if candidate.decode else 0,
            prefill_scaling=self._shrink_scaling(candidate.prefill_scaling),
            decode_scaling=self._shrink_scaling(candidate.decode_scaling),
        )

    def __call__(self, candidate: Candidate, multiplier: float = 1.0) -> Outcome:
        key = (self.simulated(candidate), multiplier)
        if key not in self._cache:
            self._cache[key] = self._simulate(key[0], multiplier)
        found = self._cache[key]
        if key[0] == candidate:
            return found
        factor = candidate.gpus / key[0].gpus  # the sub-fleet's GPUs stand for the fleet's
        return replace(
            found,
            candidate=candidate,
            gpu_hours=found.gpu_hours * factor,
            goodput_rps=found.goodput_rps / self.fleet_scale,
            timeline=tuple((t, round(n * factor)) for t, n in found.timeline),
        )

    def _simulate(self, candidate: Candidate, multiplier: float) -> Outcome:
        from capacity.sim import SimOptions, sim_config_from_serve, simulate

        config = sim_config_from_serve(candidate_config(candidate, self.base))
        requests = self.requests(multiplier)
        # outcome_of reads the records only: the ITL histogram would go unread
        options = SimOptions(until_s=self.until_s, itl_histogram=False)
        if self.stop_early and multiplier == 1.0:
            limit = miss_limit(len(requests), self.slo.attainment)
            options = replace(options, miss_slo=self._record_slo, miss_limit=limit)
        result = simulate(config, self.profile, requests, seed=self.seed, options=options)
        return outcome_of(candidate, result, self._record_slo, self.traffic.duration_s)

    def _shrink(self, count: int) -> int:
        return max(1, math.floor(count * self.fleet_scale + 1e-9))

    def _shrink_scaling(self, scaling: Autoscale | None) -> Autoscale | None:
        if scaling is None:
            return None
        high = self._shrink(scaling.max_replicas)
        return replace(
            scaling, min_replicas=min(high, self._shrink(scaling.min_replicas)), max_replicas=high
        )


def miss_limit(requests: int, attainment: float) -> int:
    """The most of ``requests`` that may miss the SLO with ``attainment`` still reachable:
    with one more miss, ``(requests - misses) / requests < attainment``."""
    if requests <= 0:
        return 0
    k = max(0, math.floor(requests * (1 - attainment)))
    while k > 0 and (requests - k) / requests < attainment:
        k -= 1
    while k < requests and (requests - k - 1) / requests >= attainment:
        k += 1
    return k


def outcome_of(candidate: Candidate, result: Any, slo: RecordSlo, duration_s: float) -> Outcome:
    """Reduce a SimResult to the planner's view: attainment, goodput, GPU-hours."""
    records = list(result.records)
    met = sum(slo.met_by(r) for r in records)
    first = [r for r in records if r.ok and r.ttft_s is not None]
    ttft_met = sum(r.ttft_s * 1e3 <= slo.ttft_bound_ms(r.prompt_tokens) for r in first)
    tpot_met = sum(r.tpot_s is None or r.tpot_s * 1e3 <= slo.tpot_ms for r in first)
    share = 1 / len(records) if records else 0.0
    ttfts = [r.ttft_s for r in records if r.ok and r.ttft_s is not None]
    tpots = [r.tpot_s for r in records if r.ok and r.tpot_s is not None]
    timeline = gpu_timeline(result.replica_timeline)
    return Outcome(
        candidate=candidate,
        attainment=met / len(records) if records else 0.0,
        goodput_rps=met / duration_s,
        gpu_hours=gpu_hours(timeline, duration_s, candidate.gpus),
        ttft_p90_s=percentile(ttfts, 90) if ttfts else None,
        tpot_p90_s=percentile(tpots, 90) if tpots else None,
        requests=len(records),
        ttft_attainment=ttft_met * share,
        tpot_attainment=tpot_met * share,
        events=int(result.events),
        wall_s=float(result.wall_s),
        timeline=timeline,
        stopped_s=getattr(result, "stopped_s", None),
    )


def gpu_timeline(entries: Sequence[Sequence[Any]]) -> tuple[tuple[float, int], ...]:
    """``(t, pool, role, replicas)`` changes → ``(t, total replicas)`` steps."""
    current: dict[tuple[str, str], int] = {}
    steps: list[tuple[float, int]] = []
    for t, pool, role, replicas in sorted(entries, key=lambda e: e[0]):
        current[(pool, role)] = int(replicas)
        total = sum(current.values())
        if steps and steps[-1][0] == t:
            steps[-1] = (float(t), total)
        else:
            steps.append((float(t), total))
    return tuple(steps)


def gpu_hours(timeline: Sequence[tuple[float, int]], duration_s: float, fixed: int) -> float:
    """The timeline's integral over [0, duration] in hours (``fixed`` GPUs if it is empty)."""
    if not timeline:
        return fixed * duration_s / 3600
    total, points = 0.0, [*timeline, (duration_s, 0)]
    for (t0, gpus), (t1, _) in itertools.pairwise(points):
        total += gpus * max(0.0, min(t1, duration_s) - max(t0, 0.0))
    return total / 3600
