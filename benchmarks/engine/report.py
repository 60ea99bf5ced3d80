"""The engine benchmark's table, roofline line and goals (PASS / MISS)."""

from __future__ import annotations

from benchmarks._common import print_table
from benchmarks.engine.runner import Measurement

GOALS = (  # (workload, baseline system, minimum ours/baseline throughput ratio)
    ("batch1", "hf", 1.0),
    ("mixed", "hf_static", 1.5),
    ("mixed", "hf_cb", 2.0),
)


def ratio(results: list[Measurement], workload: str, baseline: str) -> float | None:
    by = {m.system: m for m in results if m.workload == workload}
    if "ours" not in by or baseline not in by:
        return None
    return by["ours"].tok_s / by[baseline].tok_s


def print_report(results: list[Measurement], roof: dict, model_info: dict, bw: dict) -> list:
    rows = []
    for m in results:
        r = ratio(results, m.workload, m.system)
        rows.append(
            [
                m.workload,
                m.system,
                m.num_requests,
                m.useful_tokens,
                m.computed_tokens,
                m.wall,
                m.tok_s,
                None if m.ttft is None else m.ttft * 1e3,
                None if m.tpot is None else m.tpot * 1e3,
                None if m.exact_match_vs_ref is None else m.exact_match_vs_ref,
                None if r is None else r,
            ]
        )
    print_table(
        [
            "workload",
            "system",
            "reqs",
            "useful tok",
            "decoded tok",
            "wall s",
            "tok/s",
            "TTFT ms",
            "TPOT ms",
            "match hf",
            "ours x",
        ],
        rows,
        title="Engine throughput (tok/s = useful output tokens / wall s)",
    )
    bound = roof["decode_s_per_token_bound"]
    print(
        f"\nBatch-1 roofline: {model_info['weight_bytes'] / 1e6:.1f} MB weights / "
        f"{roof['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s = {bound * 1e3:.2f} ms/token "
        f"(<= {1 / bound:.1f} tok/s). Bandwidth, best of: copy (read+write) "
        f"{bw['copy_bytes_per_s'] / 1e9:.2f} GB/s, read {bw['read_bytes_per_s'] / 1e9:.2f} GB/s"
    )
    for system, frac in roof["fraction_of_roofline"].items():
        print(f"  {system}: TPOT reaches {frac:.0%} of the roofline")
    goals = []
    print("\nGoals:")
    for workload, baseline, target in GOALS:
        got = ratio(results, workload, baseline)
        status = "n/a" if got is None else ("PASS" if got >= target else "MISS")
        shown = "-" if got is None else f"{got:.2f}x"
        print(f"  {workload}: ours vs {baseline} >= {target:.1f}x: {shown} {status}")
        goals.append(
            {
                "workload": workload,
                "baseline": baseline,
                "target": target,
                "ratio": got,
                "status": status,
            }
        )
    return goals
