"""``pdserve simulate``: a simulated ``pdserve bench run`` — same flags, same results.json.

    pdserve simulate --config deploy/serve.yaml --profile capacity/profiles/X.json \\
        --workload shared_prefix --rate 2 --seed 0 --out DIR
    pdserve simulate --config SERVE_YAML --profile FILE --trace mooncake.jsonl

The workload and load flags are bench run's own (:func:`loadgen.cli.add_workload_args`,
:func:`loadgen.cli.add_slo_args`), so a real and a simulated run are one flag apart. The
run in ``results.json`` says ``"simulated": true`` and names the profile; ``report.md``
and the plots are :func:`loadgen.report.write_report`'s. The simulator's events, wall
time and events/s are printed and kept under the run's ``simulator`` key.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from loadgen.cli import (
    add_slo_args,
    add_workload_args,
    load_from_args,
    slo_from_args,
    workload_from_args,
)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "simulate"


def add_parser(commands: Any) -> None:
    """Register ``simulate`` on the ``pdserve`` parser."""
    command = commands.add_parser(
        "simulate", help="simulate `pdserve bench run` on a Serve YAML with a cost profile"
    )
    command.add_argument("--config", type=Path, default=None, help="Serve YAML (default: ours)")
    command.add_argument("--profile", type=Path, required=True, help="cost profile JSON")
    command.add_argument("--pool", default=None, help="router pool (default: the default pool)")
    add_workload_args(command)
    command.add_argument("--drain", type=float, default=120.0, help="then wait this long (s)")
    add_slo_args(command)
    command.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="replay a JSONL / Mooncake trace instead of --workload",
    )
    command.add_argument(
        "--block-stride",
        type=int,
        default=1,
        help="simulate KV blocks of N engine blocks (big fleets: 4-8)",
    )
    command.add_argument("--label", default="", help="name of this run in the report")
    command.add_argument("--model-dir", default=None, help="tokenizer dir (default: the model)")
    command.add_argument("--out", type=Path, default=None)
    command.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from capacity.profile import Profile, ProfileError
    from capacity.sim import SimOptions, sim_config_from_serve, simulate
    from deploy.serve_config import DEFAULT_CONFIG

    try:
        profile = Profile.load(args.profile)
        config = sim_config_from_serve(args.config or DEFAULT_CONFIG, args.pool)
        workload = workload_from_args(args)
        load = load_from_args(args, progress=False)
        if args.block_stride < 1:
            raise ValueError("--block-stride must be >= 1")
    except (ValueError, ProfileError) as exc:
        print(f"pdserve simulate: {exc}", file=sys.stderr)
        return 2
    block_size = config.pools[0].engine.block_size
    requests = _requests(args, workload, block_size)
    # A trace is replayed whole; a workload is bounded like bench run (--max-duration, --drain).
    bounded = args.trace is None
    options = SimOptions(
        concurrency=None if args.rate or args.trace else args.concurrency,
        max_start_s=args.max_duration if bounded else float("inf"),
        until_s=args.max_duration + args.drain if bounded else float("inf"),
        block_stride=args.block_stride,
    )
    source = f"trace {args.trace}" if args.trace else workload.kind
    print(f"{source}: {len(requests)} requests, {load.describe()} (simulated)", file=sys.stderr)
    result = simulate(config, profile, requests, seed=args.seed, options=options)
    print(
        f"simulated {result.duration_s:.1f} s: {result.events} events in {result.wall_s:.2f} s "
        f"({result.events_per_s:,.0f} events/s)",
        file=sys.stderr,
    )
    label = args.label or f"simulated {Path(args.config or DEFAULT_CONFIG).name}"
    run = result.run_entry(
        label, slo_from_args(args), dataclasses.asdict(workload), dataclasses.asdict(load)
    )
    if args.trace:
        run["workload"] = {"kind": "trace", "path": str(args.trace)}
    results = {"environment": _environment(profile), "runs": [run]}
    return _write(results, args.out or DEFAULT_OUT)


def _requests(args: argparse.Namespace, workload: Any, block_size: int) -> list[Any]:
    if args.trace:
        from capacity.trace import load_trace

        return load_trace(args.trace, block_size)
    from capacity.sim.workload import workload_requests
    from router.tokenizer import ModelTokenizer

    tokenizer = ModelTokenizer.load(args.model_dir)
    return workload_requests(
        workload, tokenizer, rate=args.rate, seed=args.seed, block_size=block_size
    )


def _environment(profile: Any) -> dict[str, Any]:
    """Where the numbers come from: the profile's hardware, not this machine's."""
    import platform

    from loadgen.machine import utc_timestamp

    return {
        "timestamp": utc_timestamp(),
        "simulated": True,
        "cpu_model": f"simulated: {profile.hardware}",
        "profile": {
            "hardware": profile.hardware,
            "model": profile.model,
            "dtype": profile.dtype,
            "engine": profile.engine,
            "created": profile.created,
            "sources": list(profile.sources),
        },
        "simulator_host": platform.platform(),
        "python": platform.python_version(),
    }


def _write(results: dict[str, Any], out: Path) -> int:
    from loadgen.report import run_table, write_report

    paths = write_report(results, out)
    print("\n".join(run_table(results["runs"])))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
