"""Planner at fleet scale: a plan for a ~1,000-GPU fleet over one simulated hour.

1. **Plan** (the headline): ``capacity/examples/chat-1000gpu.yaml`` (one hour, peak ~1,950
   req/s of ~6k-token prompts: ~5.9M requests) on the shipped H100 profile (or the roofline
   stand-in, :mod:`benchmarks._gpu_profile`), SLO TTFT 1 s / TPOT 50 ms for 90% of
   requests, at most 1,200 GPUs. Simulating the whole fleet-hour once takes longer than
   the 2-minute budget (part 2 measures it), so the search runs on the documented
   sub-fleet approximation (:mod:`capacity.plan_eval`: each pool at ``--fleet-scale`` of
   its size, the traffic at the same share of the rate, the whole hour), with the
   planner's early stop (:mod:`capacity.plan_eval`: a probe that can no longer meet the
   SLO stops; same search and answer). Goal: < 120 s wall for the plan, chosen
   configuration, simulations, events and events/s printed.
2. **Full fleet**: the chosen configuration simulated at full size over the first
   ``--full-window-s`` seconds of the traffic: events/s at 1,000 replicas and the time one
   full fleet-hour would take at that rate.
3. **Sub-fleet error** on a fleet small enough to simulate whole: the same traffic at
   1/20 of the rate (a ~50-GPU fleet), 5 minutes; the planned disaggregated split scaled
   to it and one decode size below/above, each simulated whole and as a sub-fleet at
   ``--error-scale``; the differences in SLO attainment, TTFT p90 and TPOT p90.

Run: ``python -m benchmarks.capacity_scale [--quick] [--out PATH]`` (``make bench-plan``);
results: ``benchmarks/results/capacity_scale.json``; tables on stdout.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks._common import announce, bench_parser, print_table, save
from benchmarks._gpu_profile import gpu_profile
from capacity.cost_model import CostModel
from capacity.plan import PlanOptions, plan
from capacity.plan_estimate import estimate
from capacity.plan_eval import SimEvaluator
from capacity.plan_report import outcome_json
from capacity.plan_types import DISAGG, Candidate, Outcome, Slo
from capacity.serve_yaml import GPU_CONFIG
from capacity.traffic import Traffic

TRAFFIC = Path(__file__).resolve().parents[1] / "capacity/examples/chat-1000gpu.yaml"
SLO = Slo(ttft_s=1.0, tpot_s=0.05)
BUDGET_S = 120.0


def run_plan(traffic: Traffic, profile: Any, scale: float) -> dict[str, Any]:
    """Part 1: the timed plan on the sub-fleet."""
    started = time.perf_counter()
    guess = estimate(traffic, SLO, CostModel(profile), budget=8192, max_seqs=256)
    evaluate = SimEvaluator(traffic, profile, SLO, GPU_CONFIG, fleet_scale=scale, stop_early=True)
    options = PlanOptions(
        max_gpus=1200,
        step=math.ceil(1 / scale),
        refine=0,
        autoscale=False,
        multipliers=(0.5, 1.0, 1.5),
        curves=1,
        top=3,
    )
    result = plan(evaluate, SLO, options, guess)
    wall = time.perf_counter() - started
    requests = sum(o.requests for o in result.outcomes)
    return {
        "fleet_scale": scale,
        "estimate": [guess.prefill, guess.decode, guess.colocated],
        "wall_s": round(wall, 2),
        "goal_s": BUDGET_S,
        "meets_goal": wall < BUDGET_S,
        "simulations": result.evaluated,
        "simulated_requests": requests,
        "events": result.events,
        "sim_wall_s": round(result.sim_wall_s, 2),
        "events_per_s": round(result.events / result.sim_wall_s) if result.sim_wall_s else None,
        "configurations": [outcome_json(o) for o in result.ranked],
        "chosen": result.chosen.candidate.label(),
        "curve": {
            label: [[p.multiplier, round(p.attainment, 4)] for p in points]
            for label, points in result.curves.items()
        },
        "_chosen": result.chosen.candidate,
        "_disagg": next((o.candidate for o in result.ranked if o.candidate.layout == DISAGG), None),
    }


def run_full(traffic: Traffic, profile: Any, chosen: Candidate, window_s: float) -> dict[str, Any]:
    """Part 2: the chosen configuration at full size over the first ``window_s``."""
    window = replace(traffic, duration_s=window_s)
    outcome = SimEvaluator(window, profile, SLO, GPU_CONFIG)(chosen)
    rate = outcome.events / outcome.wall_s if outcome.wall_s else 0.0
    per_sim_s = traffic.duration_s / window_s
    return {
        "configuration": chosen.label(),
        "window_s": window_s,
        "requests": outcome.requests,
        "events": outcome.events,
        "wall_s": round(outcome.wall_s, 2),
        "events_per_s": round(rate),
        "slo_attainment": round(outcome.attainment, 4),
        "full_hour_estimate_s": round(outcome.wall_s * per_sim_s, 1),
    }


def run_error(
    traffic: Traffic, profile: Any, chosen: Candidate, scale: float, duration_s: float
) -> dict[str, Any]:
    """Part 3: whole vs sub-fleet simulation of a 1/20-size fleet."""
    small = replace(traffic.scaled(1 / 20), duration_s=duration_s)
    whole = SimEvaluator(small, profile, SLO, GPU_CONFIG)
    sub = SimEvaluator(small, profile, SLO, GPU_CONFIG, fleet_scale=scale)
    unit = round(1 / scale)  # sizes on the sub-fleet's lattice: exact shares
    p = max(1, round(chosen.prefill / 20 / unit)) * unit
    d = max(2, round(chosen.decode / 20 / unit))
    rows = []
    for k in (-1, 0, 1):
        candidate = Candidate(DISAGG, p, (d + k) * unit)
        a, b = whole(candidate), sub(candidate)
        rows.append(_error_row(candidate, a, b, sub.simulated(candidate).label()))
    return {
        "rate_share": 1 / 20,
        "duration_s": duration_s,
        "sub_fleet_scale": scale,
        "rows": rows,
        "max_abs_attainment_error": max(r["attainment_error"] for r in rows),
    }


def _error_row(candidate: Candidate, whole: Outcome, sub: Outcome, label: str) -> dict[str, Any]:
    def rel(a: float | None, b: float | None) -> float | None:
        return round(abs(b - a) / a, 4) if a and b is not None else None

    return {
        "configuration": candidate.label(),
        "sub_fleet": label,
        "attainment_whole": round(whole.attainment, 4),
        "attainment_sub": round(sub.attainment, 4),
        "attainment_error": round(abs(whole.attainment - sub.attainment), 4),
        "ttft_p90_rel_error": rel(whole.ttft_p90_s, sub.ttft_p90_s),
        "tpot_p90_rel_error": rel(whole.tpot_p90_s, sub.tpot_p90_s),
        "whole_wall_s": round(whole.wall_s, 2),
        "sub_wall_s": round(sub.wall_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, quick="10 simulated minutes, shorter full-fleet window")
    parser.add_argument("--fleet-scale", type=float, default=0.01, help="sub-fleet share")
    parser.add_argument("--error-scale", type=float, default=0.2, help="part 3's share")
    parser.add_argument("--full-window-s", type=float, default=None)
    parser.add_argument("--skip-full", action="store_true", help="parts 1 and 3 only")
    args = parser.parse_args(argv)
    context = announce()
    profile, source = gpu_profile()
    traffic = Traffic.load(TRAFFIC)
    if args.quick:
        traffic = replace(traffic, duration_s=600.0)
    print(f"[capacity_scale] plan on a {args.fleet_scale:g} sub-fleet...", file=sys.stderr)
    planned = run_plan(traffic, profile, args.fleet_scale)
    chosen = planned.pop("_chosen")
    split = planned.pop("_disagg") or Candidate(DISAGG, 500, 500)
    print_table(
        ["plan", "wall s", "sims", "requests", "events", "events/s", "chosen"],
        [
            [
                f"{traffic.duration_s:g} s, x{args.fleet_scale:g}",
                planned["wall_s"],
                planned["simulations"],
                planned["simulated_requests"],
                planned["events"],
                planned["events_per_s"],
                planned["chosen"],
            ]
        ],
    )
    full = None
    if not args.skip_full:
        window = args.full_window_s or (5.0 if args.quick else 20.0)
        print(f"[capacity_scale] {chosen.label()} whole, {window:g} s...", file=sys.stderr)
        full = run_full(traffic, profile, chosen, window)
        print_table(
            ["full fleet", "window s", "requests", "events", "wall s", "events/s", "hour est. s"],
            [
                [
                    full["configuration"],
                    window,
                    full["requests"],
                    full["events"],
                    full["wall_s"],
                    full["events_per_s"],
                    full["full_hour_estimate_s"],
                ]
            ],
        )
    print("[capacity_scale] sub-fleet error on a 1/20 fleet...", file=sys.stderr)
    error = run_error(traffic, profile, split, args.error_scale, 120.0 if args.quick else 300.0)
    print_table(
        ["config", "sub-fleet", "attain whole", "attain sub", "|err|", "TTFT90 err", "TPOT90 err"],
        [
            [
                r["configuration"],
                r["sub_fleet"],
                r["attainment_whole"],
                r["attainment_sub"],
                r["attainment_error"],
                r["ttft_p90_rel_error"],
                r["tpot_p90_rel_error"],
            ]
            for r in error["rows"]
        ],
    )
    save(
        "capacity_scale",
        {
            **context,
            "profile": source,
            "traffic": str(TRAFFIC.relative_to(TRAFFIC.parents[2])),
            "duration_s": traffic.duration_s,
            "slo": {"ttft_ms": SLO.ttft_s * 1e3, "tpot_ms": SLO.tpot_s * 1e3},
            "plan": planned,
            "full_fleet": full,
            "sub_fleet_error": error,
        },
        args,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
