"""``pdserve plan``: the cheapest deployment of a traffic under an SLO, by simulation.

    pdserve plan --traffic capacity/examples/chat-1000gpu.yaml \\
        --profile capacity/profiles/h100-llama-3.1-8b-bf16.json \\
        --slo-ttft-ms 500 --slo-itl-ms 50 [--config BASE_YAML] [--max-gpus N] [--out DIR]

Prints the top configurations and their curves (SLO attainment / goodput vs rate
multiplier), writes ``DIR/plan.json``, ``DIR/serve.yaml`` (the chosen configuration,
checked like ``pdserve check``) and ``DIR/plan.png``. Progress lines go to stderr.
Exit status 0 with a plan, 1 when nothing within ``--max-gpus`` meets the SLO, 2 on bad
input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from capacity.plan_types import COLOCATED, DISAGG

_AUTO_SUB_FLEET = 200  # above this many GPUs (estimated), search on a sub-fleet


def add_parser(commands: Any) -> None:
    """Register ``plan`` on the ``pdserve`` parser."""
    command = commands.add_parser(
        "plan", help="search replica counts / autoscaling for a traffic and SLO (simulated)"
    )
    command.add_argument("--traffic", type=Path, required=True, help="traffic YAML")
    command.add_argument("--profile", type=Path, required=True, help="cost profile JSON")
    command.add_argument("--slo-ttft-ms", type=float, required=True)
    command.add_argument(
        "--slo-itl-ms",
        "--slo-tpot-ms",
        dest="slo_itl_ms",
        type=float,
        required=True,
        help="per-token target (TPOT of each request)",
    )
    command.add_argument(
        "--attainment",
        type=float,
        default=0.9,
        help="share of requests that must meet the SLO (default 0.9)",
    )
    command.add_argument(
        "--config",
        type=Path,
        default=None,
        help="base Serve YAML (default: serve-gpu.yaml, or serve.yaml for a cpu profile)",
    )
    command.add_argument("--max-gpus", type=int, default=64, help="peak replicas allowed")
    command.add_argument("--layouts", default=f"{DISAGG},{COLOCATED}")
    command.add_argument("--no-autoscale", action="store_true", help="fixed replica counts only")
    command.add_argument(
        "--refine",
        type=int,
        default=2,
        help="prefill sizes above the minimum tried for a cheaper split",
    )
    command.add_argument(
        "--multipliers", default="0.5,0.75,1,1.25,1.5,2", help="rate multipliers of the curves"
    )
    command.add_argument(
        "--fleet-scale",
        type=float,
        default=None,
        help="simulate this share of every pool at this share of the rate "
        f"(default: 1, or auto above {_AUTO_SUB_FLEET} estimated GPUs)",
    )
    command.add_argument(
        "--verify",
        action="store_true",
        help="with a sub-fleet, re-simulate the chosen one at full size",
    )
    command.add_argument("--seed", type=int, default=0, help="traffic and simulator seed")
    command.add_argument("--out", type=Path, default=Path("plan-out"))
    command.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from capacity.cost_model import CostModel
    from capacity.plan import PlanError, PlanOptions, plan
    from capacity.plan_estimate import estimate
    from capacity.plan_eval import SimEvaluator
    from capacity.plan_types import Slo
    from capacity.profile import Profile
    from capacity.serve_yaml import default_base

    try:
        profile = Profile.load(args.profile)
        traffic = _traffic(args.traffic, profile.block_size)
        slo = Slo(args.slo_ttft_ms / 1e3, args.slo_itl_ms / 1e3, args.attainment)
        base = args.config or default_base(profile.hardware)
        guess = estimate(traffic, slo, CostModel(profile), **_engine_limits(base))
        scale = args.fleet_scale or _auto_scale(guess.prefill + guess.decode)
        options = PlanOptions(
            max_gpus=args.max_gpus,
            layouts=tuple(x.strip() for x in args.layouts.split(",") if x.strip()),
            step=max(1, math.ceil(1 / scale - 1e-9)),
            refine=args.refine,
            autoscale=not args.no_autoscale,
            trough=_trough(traffic),
            multipliers=tuple(float(m) for m in args.multipliers.split(",")),
        )
        evaluate = SimEvaluator(
            traffic, profile, slo, base, seed=args.seed, fleet_scale=scale, stop_early=True
        )
    except (OSError, ValueError) as exc:
        print(f"pdserve plan: {exc}", file=sys.stderr)
        return 2
    print(
        f"[plan] estimate {guess.prefill}P+{guess.decode}D / {guess.colocated} colocated; "
        f"fleet scale {scale:g}",
        file=sys.stderr,
    )
    try:
        result = plan(evaluate, slo, options, guess)
    except PlanError as exc:
        print(f"pdserve plan: {exc}", file=sys.stderr)
        return 1
    return _write(args, result, evaluate, base, scale)


def _write(args: argparse.Namespace, result: Any, evaluate: Any, base: Path, scale: float) -> int:
    from capacity.plan_eval import SimEvaluator
    from capacity.plan_report import outcome_json, plan_json, tables, write_plot
    from capacity.serve_yaml import candidate_config, write_config

    args.out.mkdir(parents=True, exist_ok=True)
    chosen = result.chosen
    header = (
        f"Planned by `pdserve plan` (simulated): {chosen.candidate.label()} for "
        f"{args.traffic}\nprofile {args.profile}; SLO TTFT <= {args.slo_ttft_ms:g} ms, "
        f"TPOT <= {args.slo_itl_ms:g} ms for {args.attainment:.0%} of requests;\n"
        f"simulated attainment {chosen.attainment:.1%}, goodput {chosen.goodput_rps:.3g} req/s"
    )
    yaml_path = write_config(
        candidate_config(chosen.candidate, base), args.out / "serve.yaml", header
    )
    inputs = {
        "traffic": str(args.traffic),
        "profile": str(args.profile),
        "base_config": str(base),
        "seed": args.seed,
        "fleet_scale": scale,
        "max_gpus": args.max_gpus,
    }
    data = plan_json(result, inputs, str(yaml_path))
    if args.verify and scale < 1:
        full = SimEvaluator(evaluate.traffic, evaluate.profile, evaluate.slo, base, seed=args.seed)(
            chosen.candidate
        )
        data["verified_full_fleet"] = outcome_json(full)
        print(f"[plan] full-fleet check: attainment {full.attainment:.1%}", file=sys.stderr)
    (args.out / "plan.json").write_text(json.dumps(data, indent=1) + "\n")
    plot = write_plot(data, args.out / "plan.png")
    print(tables(result))
    print(f"\nwrote {yaml_path}, {args.out / 'plan.json'}" + (f", {plot}" if plot else ""))
    return 0


def _traffic(path: Path, block_size: int) -> Any:
    from capacity.traffic import Traffic

    traffic = Traffic.load(path)
    if traffic.block_size != block_size:  # hashes must be in the profile's blocks
        traffic = replace(traffic, block_size=block_size)
    return traffic


def _engine_limits(base: Path) -> dict[str, int]:
    """The base YAML's prefill token budget and decode batch cap (for the estimate)."""
    from capacity.sim import sim_config_from_serve

    config = sim_config_from_serve(base)
    prefill = config.prefill or config.colocated
    decode = config.decode or config.colocated
    assert prefill is not None and decode is not None
    return {"budget": prefill.engine.max_num_batched_tokens, "max_seqs": decode.active_slots}


def _auto_scale(estimated_gpus: int) -> float:
    if estimated_gpus <= _AUTO_SUB_FLEET:
        return 1.0
    return 1.0 / math.ceil(estimated_gpus / (_AUTO_SUB_FLEET / 2))


def _trough(traffic: Any) -> float:
    """Lowest / peak rate over the traffic's duration (60 samples a minute at most)."""
    peak = traffic.rate.peak()
    steps = max(1, min(int(traffic.duration_s), 3600))
    low = min(traffic.rate.at(traffic.duration_s * i / steps) for i in range(steps))
    return max(0.01, min(1.0, low / peak)) if peak > 0 else 1.0
