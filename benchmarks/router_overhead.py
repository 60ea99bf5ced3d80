"""Router overhead: how long a routing decision takes, and what the router adds to TTFT.

1. **Routing decision** (:mod:`benchmarks._routing_decisions`, in process): 16 prefill +
   16 decode workers, 100k indexed blocks, 1024-token queries. Goal: decision p99 <= 200
   µs. Percentiles are taken per round of consecutive queries (5 rounds) and the median
   round is reported, so a burst of load from another process on a shared machine does
   not decide the result; the JSON keeps every round and the pooled percentiles too.
2. **TTFT through the router vs calling the decode worker directly**
   (:mod:`benchmarks._router_ttft`): a fake worker that answers at once (the router's own
   cost), and with ``--real`` a real colocated worker running the default model (there
   the router's share is within the prefill time's own run-to-run noise). Goal (fake
   worker): router ids p50 - direct p50 <= 2 ms.

Run: ``python -m benchmarks.router_overhead [--quick] [--real] [--out PATH]``
(``make bench-router`` adds ``--real``). Results: ``benchmarks/results/router_overhead.json``
(``_quick`` suffix); tables on stdout.
"""

from __future__ import annotations

import sys
from typing import Any

from benchmarks._common import announce, bench_parser, log_directory, print_table, save
from benchmarks._router_ttft import TTFT_GOAL_MS, run_ttft
from benchmarks._routing_decisions import DECISION_GOAL_US, bench_decisions
from common.launch import exit_on_signals


def print_decisions(d: dict[str, Any]) -> None:
    print_table(
        ["span", "p50 µs", "p90 µs", "p99 µs", "mean µs", "pooled p99 µs"],
        [
            [name, *(d[key][q] for q in ("p50", "p90", "p99", "mean")), d[key]["all"]["p99"]]
            for name, key in (
                ("decision (match + policy)", "decision_us"),
                ("decision + predict", "decision_plus_predict_us"),
                ("block hashes (1024 tok)", "hashing_us"),
            )
        ],
        title=(
            f"Routing decision: {d['workers']['prefill']} prefill + {d['workers']['decode']} "
            f"decode workers, {d['indexed_entries']} indexed blocks, {d['queries']} queries "
            f"({d['queries_with_prefix_hit']} with a prefix hit); goal p99 <= "
            f"{DECISION_GOAL_US:.0f} µs: {'PASS' if d['pass'] else 'MISS'}"
        ),
    )


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
    args = parser.parse_args(argv)
    context = announce()

    decisions = bench_decisions(2000 if args.quick else 20000, 16, 16, 100_000)
    print_decisions(decisions)
    with exit_on_signals(), log_directory(args.log_dir) as log_dir:
        ttft = run_ttft(log_dir, 100 if args.quick else 500, args.real, 20 if args.quick else 60)
    for kind, t in ttft.items():
        t["pass"] = t["added_p50_ms"] <= TTFT_GOAL_MS
        print_ttft(kind, t)
    save("router_overhead", {**context, "decisions": decisions, "ttft": ttft}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
