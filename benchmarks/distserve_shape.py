"""DistServe's shape, simulated: disaggregation's goodput gain over colocation grows as the
TTFT / TPOT SLOs tighten.

DistServe (Zhong et al., OSDI 2024, Fig. 8-9) measures per-GPU goodput — the highest
request rate per GPU at which 90% of requests meet both SLOs — for disaggregated and
colocated serving while scaling the SLOs down, and the disaggregated advantage widens as
they tighten: a colocated worker's prefill steps stall its decode batch (TPOT) and its
decode batch delays prefills (TTFT), so it must run emptier to meet a tight SLO.

Here, on the shipped GPU profile (capacity/profiles/h100-llama-3.1-8b-bf16.json, or the
roofline stand-in of :mod:`benchmarks._gpu_profile` until it exists) and a chat traffic
(prompts lognormal mean 1500, outputs mean 300, Poisson arrivals), for each SLO scale s
(TTFT = s × 1 s, TPOT = s × 50 ms): the per-GPU goodput of the best of 1P+1D, 2P+1D and
1P+2D (disaggregated) and of 2 colocated workers, each by bisection on the rate (every
point one :func:`capacity.sim.simulate` run of ``--requests`` requests, seed fixed), then
the ratio disaggregated / colocated. Expected: the ratio grows as s shrinks.

Run: ``python -m benchmarks.distserve_shape [--quick] [--out PATH]``; results:
``benchmarks/results/distserve_shape.json``; the table on stdout.
"""

from __future__ import annotations

import itertools
import sys
import time
from typing import Any

from benchmarks._common import announce, bench_parser, print_table, save
from benchmarks._gpu_profile import gpu_profile
from capacity.plan_eval import SimEvaluator
from capacity.plan_types import COLOCATED, DISAGG, Candidate, Slo
from capacity.serve_yaml import GPU_CONFIG
from capacity.traffic import Traffic

SCALES = (2.0, 1.5, 1.0, 0.75, 0.5)
QUICK_SCALES = (2.0, 1.0, 0.5)
BASE_SLO = Slo(ttft_s=1.0, tpot_s=0.05)
LAYOUTS = {
    DISAGG: (Candidate(DISAGG, 1, 1), Candidate(DISAGG, 2, 1), Candidate(DISAGG, 1, 2)),
    COLOCATED: (Candidate(COLOCATED, 2),),
}
TRAFFIC = {
    "input_tokens": {"dist": "lognormal", "mean": 1500, "sd": 800, "min": 16, "max": 8192},
    "output_tokens": {"dist": "lognormal", "mean": 300, "sd": 150, "min": 8, "max": 2048},
}


class Goodput:
    """Highest rate per GPU meeting ``slo`` for 90% of requests, by bisection."""

    def __init__(self, profile: Any, requests: int, steps: int) -> None:
        self.profile, self.requests, self.steps = profile, requests, steps
        self.simulations = 0
        self.events = 0
        self.sim_wall_s = 0.0

    def attainment(self, candidate: Candidate, rate: float, slo: Slo) -> float:
        traffic = Traffic.from_mapping(
            {**TRAFFIC, "duration_s": self.requests / rate, "rate": rate, "seed": 1}
        )
        outcome = SimEvaluator(traffic, self.profile, slo, GPU_CONFIG, seed=1)(candidate)
        self.simulations += 1
        self.events += outcome.events
        self.sim_wall_s += outcome.wall_s
        return outcome.attainment

    def per_gpu(self, candidate: Candidate, slo: Slo) -> float:
        """req/s per GPU at the highest rate that still meets the SLO (0: none does)."""
        low, high = 0.0, 4.0 * candidate.gpus
        while self.attainment(candidate, high, slo) >= slo.attainment:  # find a failing rate
            low, high = high, high * 2
        for _ in range(self.steps):
            mid = (low + high) / 2
            if self.attainment(candidate, mid, slo) >= slo.attainment:
                low = mid
            else:
                high = mid
        return low / candidate.gpus


def run(scales: tuple[float, ...], goodput: Goodput) -> list[dict[str, Any]]:
    rows = []
    for scale in scales:
        slo = BASE_SLO.scaled(scale)
        best = {}
        for layout, candidates in LAYOUTS.items():
            found = [(goodput.per_gpu(c, slo), c.label()) for c in candidates]
            best[layout] = max(found)
        disagg, colocated = best[DISAGG][0], best[COLOCATED][0]
        rows.append(
            {
                "slo_scale": scale,
                "ttft_ms": round(slo.ttft_s * 1e3, 3),
                "tpot_ms": round(slo.tpot_s * 1e3, 3),
                "disagg_req_s_per_gpu": round(disagg, 4),
                "disagg_config": best[DISAGG][1],
                "colocated_req_s_per_gpu": round(colocated, 4),
                "ratio": round(disagg / colocated, 3) if colocated > 0 else None,
            }
        )
        print(f"[distserve] scale {scale}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, quick="3 SLO scales, 300 requests, coarser bisection")
    parser.add_argument("--requests", type=int, default=None, help="requests per simulation")
    args = parser.parse_args(argv)
    context = announce()
    profile, source = gpu_profile()
    requests = args.requests or (300 if args.quick else 1000)
    goodput = Goodput(profile, requests, steps=4 if args.quick else 6)
    start = time.perf_counter()
    rows = run(QUICK_SCALES if args.quick else SCALES, goodput)
    elapsed = time.perf_counter() - start
    print_table(
        ["SLO scale", "TTFT ms", "TPOT ms", "disagg /GPU", "config", "colocated /GPU", "ratio"],
        [
            [
                r["slo_scale"],
                r["ttft_ms"],
                r["tpot_ms"],
                r["disagg_req_s_per_gpu"],
                r["disagg_config"],
                r["colocated_req_s_per_gpu"],
                r["ratio"],
            ]
            for r in rows
        ],
    )
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    grows = len(ratios) == len(rows) and all(b >= a for a, b in itertools.pairwise(ratios))
    print(f"\nratio grows as the SLO tightens: {grows}; {goodput.simulations} simulations")
    save(
        "distserve_shape",
        {
            **context,
            "profile": source,
            "traffic": TRAFFIC,
            "base_slo": {"ttft_ms": BASE_SLO.ttft_s * 1e3, "tpot_ms": BASE_SLO.tpot_s * 1e3},
            "requests_per_simulation": requests,
            "rows": rows,
            "ratio_grows_as_slo_tightens": grows,
            "simulations": goodput.simulations,
            "events": goodput.events,
            "events_per_s": round(goodput.events / goodput.sim_wall_s)
            if goodput.sim_wall_s
            else None,
            "elapsed_s": round(elapsed, 2),
        },
        args,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
