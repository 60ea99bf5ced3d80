"""Router overhead: a routing decision at fleet size, and what the router adds to TTFT.

1. **Routing decision at fleet size** (:mod:`benchmarks._routing_decisions`, in process):
   fleets of 10 + 10, 100 + 100 and 1,000 + 1,000 prefill + decode workers with prefix
   indexes of 100k, 1M and 10M (worker, block) entries, capped at that size (``--quick``:
   100k / 300k / 1M), 1024-token queries. Goal: decision p99 <= 200 µs at 1,000 + 1,000
   workers and 10M blocks. Percentiles are taken per round of consecutive queries (5
   rounds) and the median round is reported, so a burst of load from another process on a
   shared machine does not decide the result; the JSON keeps every round and the pooled
   percentiles too. Per fleet also: the index's memory (its estimate and the RSS growth
   while filling it) and the registry refresh against a real redis-server holding that
   many registrations (it runs on its own schedule: a cost per refresh, not per request).
2. **TTFT through the router vs calling the decode worker directly**
   (:mod:`benchmarks._router_ttft`): a fake worker that answers at once (the router's own
   cost), and with ``--real`` a real colocated worker running the default model (there
   the router's share is within the prefill time's own run-to-run noise). Goal (fake
   worker): router ids p50 - direct p50 <= 2 ms.

Run: ``python -m benchmarks.router_overhead [--quick] [--real] [--decisions-only] [--out PATH]``
(``make bench-router`` adds ``--real``). Results: ``benchmarks/results/router_overhead.json``
(``_quick`` suffix); tables on stdout.
"""

from __future__ import annotations

import sys
from typing import Any

from benchmarks._common import announce, bench_parser, log_directory, print_table, save
from benchmarks._router_ttft import TTFT_GOAL_MS, run_ttft
from benchmarks._routing_decisions import DECISION_GOAL_US, bench_decisions, bench_refresh
from common.launch import exit_on_signals

FLEETS = [(10, 10, 100_000), (100, 100, 1_000_000), (1000, 1000, 10_000_000)]
QUICK_FLEETS = [(10, 10, 100_000), (100, 100, 300_000), (1000, 1000, 1_000_000)]


def print_fleets(fleets: list[dict[str, Any]]) -> None:
    big = fleets[-1]
    print_table(
        [
            "workers (P + D)",
            "entries indexed",
            "decision p50 µs",
            "decision p99 µs",
            "+ predict p99 µs",
            "index MB (est.)",
            "RSS growth MB",
            "refresh p50 ms",
            "refresh CPU ms",
        ],
        [
            [
                f"{d['workers']['prefill']} + {d['workers']['decode']}",
                d["indexed_entries"],
                d["decision_us"]["p50"],
                d["decision_us"]["p99"],
                d["decision_plus_predict_us"]["p99"],
                d["index_mb"],
                d["rss_growth_mb"],
                d["refresh"]["p50_ms"],
                d["refresh"]["cpu_p50_ms"],
            ]
            for d in fleets
        ],
        title=(
            f"Routing decision by fleet size ({big['queries']} queries per fleet, "
            f"{big['prompt_tokens']}-token prompts, hashing {big['hashing_us']['p50']:.0f} µs "
            f"p50 on top); goal p99 <= {DECISION_GOAL_US:.0f} µs at the largest: "
            f"{'PASS' if big['pass'] else 'MISS'}"
        ),
    )


def run_fleets(quick: bool) -> list[dict[str, Any]]:
    results = []
    for num_prefill, num_decode, entries in QUICK_FLEETS if quick else FLEETS:
        d = bench_decisions(2000 if quick else 20000, num_prefill, num_decode, entries)
        d["refresh"] = bench_refresh(num_prefill, num_decode)
        results.append(d)
    return results


def print_ttft(kind: str, t: dict[str, Any]) -> None:
    print_table(
        ["path", "p50 ms", "p90 ms", "p99 ms", "mean ms", "pooled p99 ms"],
        [
            [p, *(t[p][q] for q in ("p50", "p90", "p99", "mean")), t[p]["all"]["p99"]]
            for p in ("direct", "router ids", "router text")
        ],
        title=(
            f"TTFT, {kind} worker, {t['prompt_tokens']}-token prompt, "
            f"{t['iterations']} requests per path: router adds {t['added_p50_ms']:.2f} ms "
            f"at p50 ({t['added_p50_ms_with_tokenization']:.2f} ms with tokenization); "
            f"goal <= {TTFT_GOAL_MS:.0f} ms: {'PASS' if t['pass'] else 'MISS'}"
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, quick="fewer queries and iterations")
    parser.add_argument("--real", action="store_true", help="also measure a real worker")
    parser.add_argument("--log-dir", help="keep process logs here")
    parser.add_argument("--decisions-only", action="store_true", help="skip the TTFT part")
    args = parser.parse_args(argv)
    context = announce()

    fleets = run_fleets(args.quick)
    print_fleets(fleets)
    ttft: dict[str, Any] = {}
    if not args.decisions_only:
        with exit_on_signals(), log_directory(args.log_dir) as log_dir:
            ttft = run_ttft(
                log_dir, 100 if args.quick else 500, args.real, 20 if args.quick else 60
            )
    for kind, t in ttft.items():
        t["pass"] = t["added_p50_ms"] <= TTFT_GOAL_MS
        print_ttft(kind, t)
    payload = {**context, "decisions": fleets[-1], "fleets": fleets, "ttft": ttft}
    save("router_overhead", payload, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
