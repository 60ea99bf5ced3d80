"""Reports: results JSON → Markdown tables and PNG plots (matplotlib, no display needed).

    paths = write_report(results, out_dir)   # report.md, results.json, *.png

``results`` is ``{"environment": {...}, "runs": [...]}`` for a single `pdserve bench run`, or
``{"environment": {...}, "scenarios": {"disagg": {...}, ...}}`` for a suite. Plots:
``ttft_cdf[_SCENARIO].png`` / ``itl_cdf[_SCENARIO].png`` (a panel per workload, a curve per
run; the disagg sweep shows its headline rate), ``goodput_vs_rate.png`` (the disagg
sweep), ``hit_ratio.png`` (per routing policy, with the oracle's best).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLUMNS = (
    ("run", lambda r: _run_name(r)),
    ("ok/sent", lambda r: f"{r['summary']['completed']}/{r['summary']['requests']}"),
    ("refused", lambda r: r["summary"].get("refused")),
    ("refusal p99", lambda r: (r["summary"].get("refusal_ms") or {}).get("p99")),
    ("TTFT p50", lambda r: r["summary"]["ttft_ms"]["p50"]),
    ("TTFT p99", lambda r: r["summary"]["ttft_ms"]["p99"]),
    ("ITL p50", lambda r: r["summary"]["itl_ms"]["p50"]),
    ("ITL p99", lambda r: r["summary"]["itl_ms"]["p99"]),
    ("TPOT p50", lambda r: r["summary"]["tpot_ms"]["p50"]),
    ("E2E p50", lambda r: r["summary"]["e2e_ms"]["p50"]),
    ("req/s", lambda r: r["summary"]["throughput_req_s"]),
    ("out tok/s", lambda r: r["summary"]["output_tok_s"]),
    ("goodput", lambda r: r["summary"]["goodput_req_s"]),
    ("SLO met", lambda r: r["summary"]["slo_attainment"]),
    ("hit", lambda r: r["summary"]["hit_ratio"]),
    ("best hit", lambda r: r["summary"]["oracle_hit_ratio"]),
)


def write_report(results: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    plots = write_plots(results, out_dir)
    md_path = out_dir / "report.md"
    md_path.write_text(markdown(results, [p.name for p in plots]))
    return [json_path, md_path, *plots]


# --------------------------------------------------------------------------- markdown


def markdown(results: dict[str, Any], plots: Sequence[str] = ()) -> str:
    lines = ["# pdserve end-to-end benchmark", ""]
    lines += _environment(results.get("environment", {}))
    if "runs" in results:
        lines += ["## Runs", "", *run_table(results["runs"]), ""]
    for name, scenario in results.get("scenarios", {}).items():
        lines += [f"## {name}", "", *run_table(scenario.get("runs", [])), ""]
        if name == "disagg":
            lines += [*disagg_table(scenario), ""]
        if scenario.get("goals"):
            lines += ["Goals:", "", "```json", json.dumps(scenario["goals"], indent=1), "```", ""]
        if scenario.get("skipped"):
            lines += [scenario["skipped"], ""]
        if scenario.get("peer_error"):
            lines += [f"The peer did not run: `{scenario['peer_error'][-300:]}`", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    lines += [
        "Latencies in ms, measured at the client. ITL = every gap between streamed chunks; "
        "TPOT = (last - first chunk) / (output tokens - 1); goodput = requests/s that met the "
        "run's SLO; hit = cached / prompt tokens as the server reports them; best hit = one "
        "unbounded cache of every earlier prompt (the workload's bound for a prefill pool).",
        "",
    ]
    return "\n".join(lines)


def run_table(runs: Sequence[dict[str, Any]]) -> list[str]:
    if not runs:
        return ["(no runs)"]
    header = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    rows = ["| " + " | ".join(_cell(get(r)) for _, get in COLUMNS) + " |" for r in runs]
    return [header, rule, *rows]


DISAGG_ROWS = (  # (label, summary → value) of the side-by-side disagg table
    ("ITL p50 ms", lambda s: s["itl_ms"]["p50"]),
    ("ITL p90 ms", lambda s: s["itl_ms"]["p90"]),
    ("ITL p99 ms", lambda s: s["itl_ms"]["p99"]),
    ("ITL max ms", lambda s: s["itl_ms"]["max"]),
    ("ITL gaps > 0.5 s", lambda s: s.get("itl_gaps_over", {}).get(">500ms")),
    ("TTFT short p50 ms", lambda s: _group(s, "short", "ttft_ms", "p50")),
    ("TTFT short p99 ms", lambda s: _group(s, "short", "ttft_ms", "p99")),
    ("TTFT long p50 ms", lambda s: _group(s, "long", "ttft_ms", "p50")),
    ("output tok/s", lambda s: s["output_tok_s"]),
    ("goodput req/s", lambda s: s["goodput_req_s"]),
    ("SLO met", lambda s: s["slo_attainment"]),
    ("ok / sent", lambda s: f"{s['completed']}/{s['requests']}"),
)


def disagg_table(scenario: dict[str, Any]) -> list[str]:
    """The disagg scenario at its headline rate: a column per configuration, then
    disaggregated / each other one (< 1 is better for disaggregation on latencies)."""
    rate = scenario.get("goals", {}).get("rate")
    at = {r["label"]: r["summary"] for r in scenario.get("runs", []) if r.get("rate") == rate}
    if "disaggregated" not in at:
        return []
    others = [label for label in at if label != "disaggregated"]
    header = ["metric", *at, *(f"disagg / {label}" for label in others)]
    lines = [f"At {rate:g} req/s:", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * len(header))
    for label, get in DISAGG_ROWS:
        values = [get(summary) for summary in at.values()]
        mine = get(at["disaggregated"])
        ratios = [_ratio(mine, get(at[other])) for other in others]
        lines.append("| " + " | ".join(_cell(v) for v in [label, *values, *ratios]) + " |")
    return lines


def _group(summary: dict[str, Any], group: str, key: str, field: str) -> float | None:
    return summary.get("groups", {}).get(group, {}).get(key, {}).get(field)


def _ratio(a: Any, b: Any) -> float | None:
    numbers = isinstance(a, int | float) and isinstance(b, int | float)
    return round(a / b, 2) if numbers and b else None


def _run_name(run: dict[str, Any]) -> str:
    name = f"{run['label']} · {run['workload']['kind']}"
    if run.get("dtype"):
        name += f" [{run['dtype']}]"
    load = run["load"]
    if load["mode"] == "open":
        return f"{name} @ {load['rate']:g}/s"
    return f"{name} × {load['concurrency']}"


def _environment(env: dict[str, Any]) -> list[str]:
    if not env:
        return []
    keys = ("timestamp", "cpu_model", "cpu_count", "load_average", "torch", "transformers")
    return [", ".join(f"{k}: {env[k]}" for k in keys if k in env), ""]


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


# --------------------------------------------------------------------------- plots


def write_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    groups = {"": list(results.get("runs", []))} if results.get("runs") else {}
    for name, scenario in results.get("scenarios", {}).items():
        groups[name] = _cdf_runs(name, scenario)
    paths = []
    for name, runs in groups.items():
        if not runs:
            continue
        suffix = f"_{name}" if name else ""
        paths.append(_cdf(runs, "ttft_s", "TTFT (ms)", out_dir / f"ttft_cdf{suffix}.png"))
        paths.append(_cdf(runs, "itls_s", "inter-token gap (ms)", out_dir / f"itl_cdf{suffix}.png"))
    disagg = results.get("scenarios", {}).get("disagg")
    if disagg and disagg.get("runs"):
        paths.append(_goodput_vs_rate(disagg["runs"], out_dir / "goodput_vs_rate.png"))
    routing = results.get("scenarios", {}).get("routing")
    if routing and routing.get("runs"):
        paths.append(_hit_ratio(routing["runs"], out_dir / "hit_ratio.png"))
    return paths


def _cdf_runs(name: str, scenario: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs a scenario's CDFs show: for the disagg sweep, those at the headline rate."""
    runs = scenario.get("runs", [])
    rate = scenario.get("goals", {}).get("rate")
    if name == "disagg" and rate is not None:
        runs = [r for r in runs if r.get("rate") == rate]
    return runs


def _values(run: dict[str, Any], key: str) -> list[float]:
    values: list[float] = []
    for record in run["records"]:
        value = record.get(key)
        if record["error"] or value is None:
            continue
        values.extend(value if isinstance(value, list) else [value])
    return sorted(v * 1e3 for v in values)


def _cdf(runs: Sequence[dict[str, Any]], key: str, xlabel: str, path: Path) -> Path:
    """One panel per workload kind, one step curve per run."""
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["workload"]["kind"] for r in runs))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for run in (r for r in runs if r["workload"]["kind"] == kind):
            values = _values(run, key)
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", label=_run_name(run))
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of requests" if key == "ttft_s" else "fraction of gaps")
        ax.set_title(kind)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _goodput_vs_rate(runs: Sequence[dict[str, Any]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in sorted({r["label"] for r in runs}):
        points = sorted(
            (r["rate"], r["summary"]["goodput_req_s"]) for r in runs if r["label"] == label
        )
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    rates = sorted({r["rate"] for r in runs})
    ax.plot(rates, rates, linestyle=":", color="grey", label="offered")
    ax.set_xlabel("request rate (req/s, Poisson)")
    ax.set_ylabel("goodput (req/s meeting the SLO)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _hit_ratio(runs: Sequence[dict[str, Any]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    kinds = sorted({r["workload"]["kind"] for r in runs})
    policies = list(dict.fromkeys(r["label"] for r in runs))
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        chosen = {r["label"]: r["summary"] for r in runs if r["workload"]["kind"] == kind}
        hits = [chosen.get(p, {}).get("hit_ratio") or 0.0 for p in policies]
        ax.bar(policies, hits, color="tab:blue")
        best = max((s["oracle_hit_ratio"] for s in chosen.values()), default=0.0)
        ax.axhline(best, color="tab:red", linestyle="--", label=f"best possible {best:.2f}")
        for x, hit in enumerate(hits):
            ax.text(x, hit + 0.02, f"{hit:.2f}", ha="center", fontsize=8)
        ax.set_title(kind)
        ax.set_ylim(0, 1)
        ax.set_ylabel("prefix cache hit ratio")
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
