"""The planner: the cheapest deployments that meet an SLO, found with as few simulations as
it takes. Pure search policy over an ``evaluate(candidate, rate_multiplier) -> Outcome``
function; the mechanism (the simulator, :mod:`capacity.plan_eval`) is passed in, so the
search is unit-tested with plain functions.

The search, per layout (meeting the SLO is monotone in each pool's size):

1. **Disaggregated.** ``p_min``: the fewest prefill replicas that meet the SLO when decode
   is plentiful (``max_gpus`` decode replicas: a probe, never a plan). Searching both
   pools at once from one simulation per step does not work: a starved decode pool shows
   up as TTFT misses (KV is reserved before prefill), not TPOT ones, so TTFT cannot tell
   which pool is short. Then for ``p = p_min, p_min + step, ...`` (``refine`` steps) the
   fewest decode replicas that meet it with ``p`` prefill — one more prefill replica can
   let a tight joint SLO through with fewer decode replicas. More prefill never needs
   more decode, so each decode search is bounded by the previous answer.
2. **Colocated.** The fewest colocated workers that meet it.
3. **Autoscaled** (when the rate varies): each layout's best fixed size as
   ``max_replicas``, the trough's share of it as ``min_replicas``, and the policy targets
   (TTFT / ITL p90 targets at ``target_fractions`` of the SLO) simulated with the real
   autoscaling policies.

Every threshold search starts from the analytic :class:`~capacity.plan_types.Guess` and
brackets outward (:func:`capacity.search.min_true_near`). Feasible candidates within
``max_gpus`` are ranked by GPU-hours (the autoscaled ones use fewer at the same peak),
then peak GPUs, then goodput; the first is the plan. The top few are simulated again at
``multipliers`` × the traffic's rate: their SLO-attainment and goodput curves.

Only ``meets`` (attainment >= the target) steers the search and the ranking, so an
``evaluate`` may stop a simulation as soon as it cannot meet the SLO any more
(:class:`capacity.plan_eval.SimEvaluator`'s ``stop_early``: more misses than the attainment
allows); the progress line says so. Curve points are evaluated whole.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from capacity.plan_types import COLOCATED, DISAGG, Autoscale, Candidate, Guess, Outcome, Slo
from capacity.search import min_true_near

Evaluate = Callable[[Candidate, float], Outcome]  # (candidate, rate multiplier) -> outcome
Progress = Callable[[str], None]


class PlanError(ValueError):
    """No candidate within the bounds meets the SLO (the message says what came closest)."""


@dataclass(frozen=True)
class PlanOptions:
    max_gpus: int = 64  # replicas (one GPU each) a plan may use at its peak
    layouts: tuple[str, ...] = (DISAGG, COLOCATED)
    step: int = 1  # count granularity of the refine walk (the sub-fleet's 1/scale)
    refine: int = 2  # prefill sizes above p_min tried for a cheaper split
    autoscale: bool = True  # also try autoscaled variants (only if the rate varies)
    trough: float = 1.0  # lowest rate / peak rate of the traffic (1: constant)
    target_fractions: tuple[float, ...] = (0.5, 0.8)  # policy targets, share of the SLO
    multipliers: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # curve rates
    curves: int = 3  # how many of the top configurations get curves
    top: int = 5  # configurations listed

    def __post_init__(self) -> None:
        if self.max_gpus < 1 or self.step < 1 or self.refine < 0 or self.curves < 0:
            raise ValueError("plan: need max_gpus >= 1, step >= 1, refine >= 0, curves >= 0")
        if not set(self.layouts) <= {DISAGG, COLOCATED} or not self.layouts:
            raise ValueError(f"plan: layouts must be a non-empty subset of {DISAGG, COLOCATED}")
        if not 0 < self.trough <= 1:
            raise ValueError("plan: trough must be in (0, 1]")


@dataclass(frozen=True)
class CurvePoint:
    multiplier: float  # × the traffic's rate
    attainment: float
    goodput_rps: float
    ttft_p90_s: float | None
    tpot_p90_s: float | None


@dataclass(frozen=True)
class Plan:
    """What the search found: ranked feasible configurations, their curves, the cost."""

    slo: Slo
    ranked: tuple[Outcome, ...]  # feasible within max_gpus, cheapest first
    curves: dict[str, tuple[CurvePoint, ...]]  # candidate label -> points
    evaluated: int  # distinct simulations run
    elapsed_s: float
    events: int  # simulator events over all simulations
    sim_wall_s: float  # simulator wall time over all simulations
    outcomes: tuple[Outcome, ...] = field(default=(), repr=False)  # everything evaluated

    @property
    def chosen(self) -> Outcome:
        return self.ranked[0]


def cost_key(outcome: Outcome) -> tuple[float, int, float]:
    """Cheapest first: GPU-hours, then peak GPUs, then the best goodput."""
    return (round(outcome.gpu_hours, 6), outcome.candidate.gpus, -outcome.goodput_rps)


class _Search:
    """Caches outcomes and reports progress; the layouts' searches share it."""

    def __init__(self, evaluate: Evaluate, slo: Slo, options: PlanOptions, progress: Progress):
        self.evaluate, self.slo, self.options, self.progress = evaluate, slo, options, progress
        self.seen: dict[tuple[Candidate, float], Outcome] = {}
        self.start = time.perf_counter()

    def outcome(self, candidate: Candidate, multiplier: float = 1.0) -> Outcome:
        key = (candidate, multiplier)
        if key not in self.seen:
            self.seen[key] = self.evaluate(candidate, multiplier)
            self._report(self.seen[key], multiplier)
        return self.seen[key]

    def meets(self, candidate: Candidate) -> bool:
        return self.outcome(candidate).meets(self.slo)

    def feasible(self) -> list[Outcome]:
        """Feasible within max_gpus and minimal (no feasible one of its kind is smaller in
        one pool and no bigger in the other), cheapest first."""
        found = [
            o
            for (c, m), o in self.seen.items()
            if m == 1.0 and o.meets(self.slo) and c.gpus <= self.options.max_gpus
        ]
        minimal = [o for o in found if not any(_dominates(f.candidate, o.candidate) for f in found)]
        return sorted(minimal, key=cost_key)

    def _report(self, outcome: Outcome, multiplier: float) -> None:
        feasible = self.feasible()
        best = f"best {feasible[0].candidate.label()}" if feasible else "none feasible yet"
        rate = f" at {multiplier:g}x" if multiplier != 1.0 else ""
        if outcome.stopped_s is None:
            result = f"attainment {outcome.attainment:.3f}, goodput {outcome.goodput_rps:.3g} req/s"
        else:
            result = f"misses the SLO (stopped at {outcome.stopped_s:.0f} simulated s)"
        self.progress(
            f"[plan] {len(self.seen)} evaluated, {outcome.candidate.label()}{rate}: "
            f"{result}; {best}; {time.perf_counter() - self.start:.1f}s"
        )


def plan(
    evaluate: Evaluate,
    slo: Slo,
    options: PlanOptions = PlanOptions(),
    guess: Guess | None = None,
    progress: Progress | None = None,
) -> Plan:
    """Search (see the module doc); PlanError when nothing within ``max_gpus`` meets it."""
    search = _Search(evaluate, slo, options, progress or _stderr)
    guess = guess or Guess()
    fixed = []
    if DISAGG in options.layouts:
        fixed.append(_disagg(search, guess))
        if fixed[-1] is not None:  # a colocated fleet needs about as many GPUs
            guess = replace(guess, colocated=fixed[-1].gpus)
    if COLOCATED in options.layouts:
        fixed.append(_colocated(search, guess))
    if options.autoscale and options.trough < 1.0:
        for best in fixed:
            if best is not None:
                _autoscaled(search, best)
    ranked = search.feasible()
    if not ranked:
        raise PlanError(_infeasible_message(search))
    top = tuple(ranked[: options.top])
    curves = {o.candidate.label(): _curve(search, o.candidate) for o in top[: options.curves]}
    outcomes = tuple(search.seen.values())
    return Plan(
        slo=slo,
        ranked=top,
        curves=curves,
        evaluated=len(search.seen),
        elapsed_s=time.perf_counter() - search.start,
        events=sum(o.events for o in outcomes),
        sim_wall_s=sum(o.wall_s for o in outcomes),
        outcomes=outcomes,
    )


def _dominates(a: Candidate, b: Candidate) -> bool:
    """``a`` is ``b`` with fewer replicas in some pool and no more in any."""
    same_kind = a.layout == b.layout and (a.prefill_scaling is None) == (b.prefill_scaling is None)
    smaller = a.prefill <= b.prefill and a.decode <= b.decode
    return same_kind and smaller and a.gpus < b.gpus


def _threshold(
    search: _Search, pred: Callable[[int], bool], guess: int, low: int, high: int, grow: int = 2
) -> int | None:
    """The smallest count in [low, high] meeting ``pred``, on the lattice of multiples of
    ``step`` (a sub-fleet cannot tell counts between them apart); None if none does."""
    step = search.options.step
    if step == 1:
        return min_true_near(pred, guess, low, high, grow)
    k_low, k_high = max(1, math.ceil(low / step)), high // step
    k = min_true_near(lambda k: pred(k * step), round(guess / step), k_low, k_high, grow)
    return None if k is None else k * step


def _disagg(search: _Search, guess: Guess) -> Candidate | None:
    """The cheapest fixed prefill:decode split (step 1 of the module doc)."""
    cap, step = search.options.max_gpus, search.options.step
    if cap < 2:
        return None
    p_min = _threshold(
        search, lambda p: search.meets(Candidate(DISAGG, p, cap)), guess.prefill, 1, cap - 1
    )
    if p_min is None:
        return None
    best: Candidate | None = None
    d_high, d_guess = cap - p_min, guess.decode
    for k in range(search.options.refine + 1):
        p = p_min + k * step
        if p >= cap:
            break
        d = _threshold(
            search,
            lambda d, p=p: search.meets(Candidate(DISAGG, p, d)),
            d_guess,
            1,
            min(d_high, cap - p),
        )
        if d is None:
            continue
        if best is None or p + d < best.gpus:
            best = Candidate(DISAGG, p, d)
        d_high, d_guess = d, d
        if d <= step:
            break
    return best


def _colocated(search: _Search, guess: Guess) -> Candidate | None:
    cap = search.options.max_gpus
    n = _threshold(search, lambda n: search.meets(Candidate(COLOCATED, n)), guess.colocated, 1, cap)
    return None if n is None else Candidate(COLOCATED, n)


def _autoscaled(search: _Search, fixed: Candidate) -> None:
    """Autoscaled variants of a fixed-size winner: same peak, trough-sized minimum."""
    slo, trough = search.slo, search.options.trough
    for fraction in search.options.target_fractions:
        ttft = (("ttft_p90_ms", round(slo.ttft_s * 1e3 * fraction, 3)),)
        itl = (("itl_p90_ms", round(slo.tpot_s * 1e3 * fraction, 3)),)
        low = max(1, math.floor(fixed.prefill * trough))
        if fixed.layout == COLOCATED:
            scaled = replace(fixed, prefill_scaling=Autoscale(low, fixed.prefill, itl))
        else:
            low_d = max(1, math.floor(fixed.decode * trough))
            scaled = replace(
                fixed,
                prefill_scaling=Autoscale(low, fixed.prefill, ttft),
                decode_scaling=Autoscale(low_d, fixed.decode, itl),
            )
        search.outcome(scaled)


def _curve(search: _Search, candidate: Candidate) -> tuple[CurvePoint, ...]:
    points = []
    for m in search.options.multipliers:
        o = search.outcome(candidate, m)
        points.append(CurvePoint(m, o.attainment, o.goodput_rps, o.ttft_p90_s, o.tpot_p90_s))
    return tuple(points)


def _infeasible_message(search: _Search) -> str:
    slo, cap = search.slo, search.options.max_gpus
    within = [o for (c, m), o in search.seen.items() if m == 1.0 and c.gpus <= cap]
    closest = max(within, key=lambda o: o.attainment, default=None)
    near = (
        f"; closest: {closest.candidate.label()} with {closest.attainment:.1%}" if closest else ""
    )
    return (
        f"no configuration within {cap} GPUs meets the SLO (TTFT <= {slo.ttft_s * 1e3:g} ms, "
        f"TPOT <= {slo.tpot_s * 1e3:g} ms for {slo.attainment:.0%} of requests){near}: "
        "raise --max-gpus or relax the SLO"
    )


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
