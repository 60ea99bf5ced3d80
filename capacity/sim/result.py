"""What a simulation returns, and the same ``results.json`` as ``pdserve bench run``.

:class:`SimResult` carries the load generator's own :class:`~loadgen.record.RequestRecord`
per request, so :func:`loadgen.summary.summarize` and :func:`loadgen.report.write_report`
work on it unchanged. :meth:`SimResult.run_entry` is one entry of ``results["runs"]`` in
the bench-run schema (label, target, workload, load, summary, records) plus
``"simulated": true`` and the profile's name.

Large runs do not keep every token's time (``token_times == "summary"``): each record then
holds its first token and its last (TTFT, TPOT and E2E stay exact) and the ITL
distribution comes from :class:`ItlHistogram`, which every decode step fed, weighted by
its batch. ``summary["itl_ms"]`` and ``summary["itl_gaps_over"]`` are then the
histogram's (log bins 1% wide) and ``summary["itl_source"]`` says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from loadgen.record import RequestRecord
from loadgen.summary import STALL_THRESHOLDS_MS, Slo, summarize

_BIN_RATIO = 1.01
_LOG_RATIO = math.log(_BIN_RATIO)
_MIN_S = 1e-6
_RAMP_POINTS = 8


class ItlHistogram:
    """Inter-token gaps, weighted, in log-spaced bins; fed per decode run (a ramp)."""

    def __init__(self) -> None:
        self.bins: dict[int, float] = {}
        self.total = 0.0
        self.weighted_sum = 0.0
        self.max_s = 0.0

    def add_ramp(self, weight: int, first: float, last: float, count: int) -> None:
        """``count`` gaps evenly spread from ``first`` to ``last``, each seen ``weight``
        times (a run of ``count`` steps with a batch of ``weight``)."""
        if count <= 0 or weight <= 0:
            return
        if count == 1 or last == first or last <= 0.0:
            self._add(first, weight * count)
            return
        k = min(count, _RAMP_POINTS)
        each = weight * count / k
        step = (last - first) / k
        # _add's arithmetic, in the same order, with the state in locals (a hot loop)
        bins, get, log = self.bins, self.bins.get, math.log
        total, weighted, top = self.total, self.weighted_sum, self.max_s
        for i in range(k):
            gap_s = first + step * (i + 0.5)
            key = int(log(max(gap_s, _MIN_S) / _MIN_S) / _LOG_RATIO)
            bins[key] = get(key, 0.0) + each
            total += each
            weighted += gap_s * each
            if gap_s > top:
                top = gap_s
        self.total, self.weighted_sum = total, weighted
        self.max_s = max(top, last)

    def _add(self, gap_s: float, weight: float) -> None:
        key = int(math.log(max(gap_s, _MIN_S) / _MIN_S) / _LOG_RATIO)
        self.bins[key] = self.bins.get(key, 0.0) + weight
        self.total += weight
        self.weighted_sum += gap_s * weight
        if gap_s > self.max_s:
            self.max_s = gap_s

    def quantile_s(self, q: float) -> float:
        target = self.total * q
        seen = 0.0
        for key in sorted(self.bins):
            seen += self.bins[key]
            if seen >= target:
                return _MIN_S * _BIN_RATIO ** (key + 0.5)
        return self.max_s

    def over(self, threshold_s: float) -> int:
        key0 = int(math.log(threshold_s / _MIN_S) / _LOG_RATIO)
        return round(sum(w for k, w in self.bins.items() if k > key0))

    def distribution_ms(self) -> dict[str, float | int | None]:
        if not self.total:
            return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
        return {
            "n": round(self.total),
            "mean": round(self.weighted_sum / self.total * 1e3, 3),
            "p50": round(self.quantile_s(0.5) * 1e3, 3),
            "p90": round(self.quantile_s(0.9) * 1e3, 3),
            "p99": round(self.quantile_s(0.99) * 1e3, 3),
            "max": round(self.max_s * 1e3, 3),
        }


@dataclass(slots=True)
class PoolUse:
    """One role's utilisation: busy step time over replica time."""

    busy_s: float = 0.0
    replica_s: float = 0.0

    @property
    def utilisation(self) -> float | None:
        return self.busy_s / self.replica_s if self.replica_s else None


@dataclass
class SimResult:
    records: list[RequestRecord]
    replica_timeline: list[tuple[float, str, str, int]]  # (t, pool, role, replicas)
    events: int
    wall_s: float
    duration_s: float  # simulated: first arrival to last end
    utilisation: dict[str, PoolUse] = field(default_factory=dict)  # by role
    itl: ItlHistogram | None = None  # None: exact per-token times in the records
    profile: str = ""  # "<hardware> / <model> / <dtype>"
    hit_oracle: tuple[int, int] = (0, 0)  # (cached tokens, prompt tokens) of the oracle
    unsent: int = 0  # turns never sent (an earlier turn failed, or past max_start_s)
    stopped_s: float | None = None  # stopped early here (SimOptions.miss_limit); None: ran out

    @property
    def token_times(self) -> str:
        return "full" if self.itl is None else "summary"

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self, slo: Slo) -> dict[str, Any]:
        """:func:`loadgen.summary.summarize` of the records (ITL from the histogram when
        token times were not kept), plus the oracle's best hit ratio, as bench run adds."""
        out = summarize(self.records, self.duration_s, slo, self.unsent)
        if self.itl is not None:
            out["itl_ms"] = self.itl.distribution_ms()
            out["itl_gaps_over"] = {f">{t}ms": self.itl.over(t / 1e3) for t in STALL_THRESHOLDS_MS}
            out["itl_source"] = "histogram"
        cached, prompt = self.hit_oracle
        oracle = cached / prompt if prompt else 0.0
        achieved = out["hit_ratio"]
        out["oracle_hit_ratio"] = round(oracle, 4)
        out["hit_of_best"] = (
            round(achieved / oracle, 4) if achieved is not None and oracle > 0 else None
        )
        return out

    def run_entry(
        self,
        label: str,
        slo: Slo,
        workload: dict[str, Any] | None = None,
        load: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One ``results["runs"]`` entry, the bench-run schema, labelled simulated."""
        return {
            "label": label,
            "target": "simulated",
            "workload": workload or {},
            "load": load or {},
            "summary": self.summary(slo),
            "records": [r.to_json() for r in self.records],
            "simulated": True,
            "profile": self.profile,
            "simulator": {
                "events": self.events,
                "wall_s": round(self.wall_s, 3),
                "events_per_s": round(self.events_per_s),
                "token_times": self.token_times,
                "stopped_s": self.stopped_s,
                "replica_timeline": [list(row) for row in self.replica_timeline],
                "utilisation": {
                    role: {**asdict(use), "utilisation": use.utilisation}
                    for role, use in self.utilisation.items()
                },
            },
        }


def oracle_hits(
    chains: Sequence[tuple[int, ...]], prompts: Sequence[int], block_size: int
) -> tuple[int, int]:
    """loadgen.oracle.best_hits on block-hash chains: one unbounded cache of every earlier
    prompt, leading full blocks, at least one token left to compute."""
    seen: set[int] = set()
    cached = 0
    for chain, prompt in zip(chains, prompts, strict=True):
        limit = min(len(chain), (prompt - 1) // block_size)
        n = 0
        while n < limit and chain[n] in seen:
            n += 1
        cached += n * block_size
        seen.update(chain)
    return cached, sum(prompts)
