"""The engine benchmark's table, roofline lines and goals (PASS / MISS / n/a)."""

from __future__ import annotations

from typing import Any

from benchmarks._common import print_table
from benchmarks.engine.runner import Measurement

PEER = "vllm"
WORKLOADS = ("batch1", "mixed", "decode")
# issue 14: (dtype, minimum ours/vLLM throughput) on every workload
THROUGHPUT_GOALS = (("bfloat16", 1.2), ("float32", 1.0))
ROOFLINE_GOAL = ("bfloat16", 0.70)  # batch-1 TPOT share of the weight-bandwidth bound


def ratio(results: list[Measurement], workload: str, dtype: str, baseline: str) -> float | None:
    """Our tok/s over ``baseline``'s on the same workload and dtype."""
    by = {m.system: m for m in results if m.workload == workload and m.dtype == dtype}
    if "ours" not in by or baseline not in by:
        return None
    return by["ours"].tok_s / by[baseline].tok_s


def _row(m: Measurement, results: list[Measurement]) -> list[Any]:
    r = ratio(results, m.workload, m.dtype, m.system)
    return [
        m.workload,
        m.dtype,
        m.system,
        m.num_requests,
        m.useful_tokens,
        m.wall,
        m.tok_s,
        None if m.ttft is None else m.ttft * 1e3,
        None if m.tpot is None else m.tpot * 1e3,
        m.peak_rss_bytes / 2**20,
        "-" if m.exact_match_vs_ref is None else f"{m.exact_match_vs_ref:.0%} vs {m.reference}",
        None if r is None or m.system == "ours" else r,
    ]


def print_results(results: list[Measurement]) -> None:
    order = {w: i for i, w in enumerate(WORKLOADS)}
    rows = sorted(results, key=lambda m: (order.get(m.workload, 9), m.dtype, m.system != "ours"))
    headers = ["workload", "dtype", "system", "reqs", "out tok", "wall s", "tok/s", "TTFT ms"]
    headers += ["TPOT ms", "peak RSS MiB", "greedy match", "ours x"]
    print_table(
        headers,
        [_row(m, results) for m in rows],
        title="Engine throughput (tok/s = output tokens / wall s; ours x = ours / that row)",
    )


def print_roofline(roof: dict[str, dict[str, Any]], bw: dict[str, float]) -> None:
    print(
        f"\nBandwidth, best of: copy (read+write) {bw['copy_bytes_per_s'] / 1e9:.2f} GB/s, "
        f"read {bw['read_bytes_per_s'] / 1e9:.2f} GB/s"
    )
    for dtype, r in roof.items():
        bound = r["decode_s_per_token_bound"]
        shares = ", ".join(f"{s} {f:.0%}" for s, f in r["fraction_of_roofline"].items())
        print(
            f"Batch-1 roofline {dtype}: {r['weight_bytes'] / 1e6:.1f} MB weights / "
            f"{r['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s = {bound * 1e3:.2f} ms/token "
            f"(<= {1 / bound:.1f} tok/s); TPOT reaches: {shares or '-'}"
        )


def _goal(name: str, got: float | None, target: float, unit: str = "x") -> dict[str, Any]:
    status = "n/a" if got is None else ("PASS" if got >= target else "MISS")
    shown = "-" if got is None else (f"{got:.2f}x" if unit == "x" else f"{got:.0%}")
    wanted = f"{target:.1f}x" if unit == "x" else f"{target:.0%}"
    print(f"  {name} >= {wanted}: {shown} {status}")
    return {"goal": name, "target": target, "value": got, "status": status}


def print_goals(results: list[Measurement], roof: dict[str, dict[str, Any]]) -> list[dict]:
    """Issue 14's goals; n/a where a side was not measured (e.g. no peer installed)."""
    print("\nGoals:")
    goals = []
    for dtype, target in THROUGHPUT_GOALS:
        for workload in WORKLOADS:
            got = ratio(results, workload, dtype, PEER)
            goals.append(_goal(f"{workload} {dtype} ours/vLLM tok/s", got, target))
    dtype, target = ROOFLINE_GOAL
    share = roof.get(dtype, {}).get("fraction_of_roofline", {}).get("ours")
    goals.append(_goal(f"batch1 {dtype} TPOT share of roofline", share, target, unit="%"))
    for dtype in sorted({m.dtype for m in results}):
        rss = {m.system: m.peak_rss_bytes for m in results if m.dtype == dtype}
        got = rss[PEER] / rss["ours"] if "ours" in rss and PEER in rss else None
        goals.append(_goal(f"{dtype} vLLM peak RSS / ours (same KV size)", got, 1.0))
    return goals
