"""A :class:`~capacity.plan.Plan` as plan.json, text tables and a plot.

plan.json (``version`` 1): ``slo``, ``inputs`` (traffic, profile, base YAML, seed,
fleet_scale), ``search`` (evaluated simulations, elapsed and simulator seconds, events,
events/s), ``configurations`` (the ranked feasible ones, cheapest first: layout, counts,
autoscaling, GPUs at peak, GPU-hours, SLO attainment, goodput, TTFT/TPOT p90),
``chosen`` (the first one's label and the YAML written) and ``curves`` (per label: rate
multiplier → attainment, goodput, p90s). All simulated: ``simulated: true``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from capacity.plan import Plan
from capacity.plan_types import Candidate, Outcome

PLAN_VERSION = 1


def candidate_json(candidate: Candidate) -> dict[str, Any]:
    data = asdict(candidate)
    data["label"] = candidate.label()
    data["gpus"] = candidate.gpus
    for key in ("prefill_scaling", "decode_scaling"):
        if data[key] is not None:
            data[key]["targets"] = dict(data[key]["targets"])
    return data


def outcome_json(outcome: Outcome) -> dict[str, Any]:
    return {
        **candidate_json(outcome.candidate),
        "gpu_hours": round(outcome.gpu_hours, 3),
        "slo_attainment": round(outcome.attainment, 4),
        "ttft_attainment": _round(outcome.ttft_attainment),
        "tpot_attainment": _round(outcome.tpot_attainment),
        "goodput_req_s": round(outcome.goodput_rps, 4),
        "ttft_p90_ms": _ms(outcome.ttft_p90_s),
        "tpot_p90_ms": _ms(outcome.tpot_p90_s),
        "requests": outcome.requests,
    }


def plan_json(result: Plan, inputs: dict[str, Any], yaml_path: str) -> dict[str, Any]:
    rate = result.events / result.sim_wall_s if result.sim_wall_s > 0 else None
    return {
        "version": PLAN_VERSION,
        "simulated": True,
        "slo": {
            "ttft_ms": result.slo.ttft_s * 1e3,
            "tpot_ms": result.slo.tpot_s * 1e3,
            "attainment": result.slo.attainment,
        },
        "inputs": inputs,
        "search": {
            "evaluated": result.evaluated,
            "elapsed_s": round(result.elapsed_s, 3),
            "sim_wall_s": round(result.sim_wall_s, 3),
            "events": result.events,
            "events_per_s": round(rate) if rate else None,
        },
        "configurations": [outcome_json(o) for o in result.ranked],
        "chosen": {"label": result.chosen.candidate.label(), "serve_yaml": yaml_path},
        "curves": {
            label: [
                {
                    "multiplier": p.multiplier,
                    "slo_attainment": round(p.attainment, 4),
                    "goodput_req_s": round(p.goodput_rps, 4),
                    "ttft_p90_ms": _ms(p.ttft_p90_s),
                    "tpot_p90_ms": _ms(p.tpot_p90_s),
                }
                for p in points
            ]
            for label, points in result.curves.items()
        },
    }


def tables(result: Plan) -> str:
    """The top configurations and their curves, as aligned text."""
    lines = ["rank  configuration              GPUs  GPU-h    attain  goodput  TTFT90  TPOT90"]
    for rank, o in enumerate(result.ranked, 1):
        lines.append(
            f"{rank:>4}  {o.candidate.label():<24} {o.candidate.gpus:>5} {o.gpu_hours:>7.3g}"
            f"  {o.attainment:>6.1%} {o.goodput_rps:>8.3g} {_cell(o.ttft_p90_s)} "
            f"{_cell(o.tpot_p90_s)}"
        )
    for label, points in result.curves.items():
        lines.append(f"\ncurve of {label}: rate x, SLO attainment, goodput req/s")
        lines.extend(
            f"  {p.multiplier:>5.2f}x  {p.attainment:>6.1%}  {p.goodput_rps:>8.3g}" for p in points
        )
    lines.append(
        f"\n{result.evaluated} simulations, {result.events} events in {result.sim_wall_s:.1f}s "
        f"of simulation ({result.elapsed_s:.1f}s in all)"
    )
    return "\n".join(lines)


def write_plot(data: dict[str, Any], path: Path) -> Path | None:
    """SLO attainment and goodput vs rate multiplier, one line per configuration."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is in the [bench] extra
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, points in data["curves"].items():
        xs = [p["multiplier"] for p in points]
        left.plot(xs, [p["slo_attainment"] for p in points], marker="o", label=label)
        right.plot(xs, [p["goodput_req_s"] for p in points], marker="o", label=label)
    left.axhline(data["slo"]["attainment"], color="grey", linestyle="--", linewidth=1)
    left.set(xlabel="rate (x traffic)", ylabel="SLO attainment", title="simulated")
    right.set(xlabel="rate (x traffic)", ylabel="goodput (req/s)", title="simulated")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


def _cell(seconds: float | None) -> str:
    return f"{'-':>6}" if seconds is None else f"{seconds * 1e3:>6.0f}"
