"""``pdserve bench``: drive a server, run the comparison suite, or re-render a report.

    pdserve bench run --target grpc://127.0.0.1:50051 --workload shared_prefix --rate 2
    pdserve bench run --target http://127.0.0.1:8000 --model NAME --concurrency 4
    pdserve bench suite [--quick] [--only disagg,routing,peer,vllm,overload] [--out DIR]
                        [--configs disaggregated,colocated,colocated-256,...]
    pdserve bench report DIR/results.json [--out DIR]

Each writes ``results.json``, ``report.md`` and the PNG plots into ``--out`` (default
``benchmarks/results/e2e/<command>``) and prints the summary table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from loadgen.workload import WORKLOAD_KINDS, WorkloadSpec

RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "e2e"
_WORKLOAD_FLAGS = tuple(
    f.name
    for f in dataclasses.fields(WorkloadSpec)
    if f.name not in ("kind", "seed", "extra") and f.type in ("int", "float")
)


def add_parser(commands: Any) -> None:
    """Register ``bench`` and its subcommands on the ``pdserve`` parser."""
    bench = commands.add_parser("bench", help="end-to-end load generator and comparisons")
    sub = bench.add_subparsers(required=True, metavar="BENCH_COMMAND")

    run = sub.add_parser("run", help="drive one running server with one workload")
    run.add_argument("--target", required=True, help="grpc://HOST:PORT or http://HOST:PORT")
    run.add_argument("--model", default="", help="pool (gRPC) or model field (HTTP)")
    add_workload_args(run)
    run.add_argument("--drain", type=float, default=120.0, help="then wait this long (s)")
    run.add_argument("--request-timeout", type=float, default=300.0)
    run.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="generate max tokens past EOS (default: on for grpc://, off for http:// since "
        "only some OpenAI servers know the field)",
    )
    add_slo_args(run)
    run.add_argument("--label", default="", help="name of this run in the report")
    run.add_argument("--model-dir", default=None, help="tokenizer dir (default: the model)")
    run.add_argument("--out", type=Path, default=None)
    run.set_defaults(handler=_run)

    suite = sub.add_parser("suite", help="start each configuration locally and compare")
    suite.add_argument("--quick", action="store_true", help="tiny counts: a smoke test")
    suite.add_argument("--only", default=",".join(_scenarios()), help="comma-separated")
    suite.add_argument(
        "--configs",
        default=None,
        help=f"disagg scenario's configurations, comma-separated, from {','.join(_configs())} "
        "(default disaggregated,colocated; the goals compare those two)",
    )
    suite.add_argument("--out", type=Path, default=None)
    suite.add_argument("--log-dir", type=Path, default=None, help="keep server logs here")
    suite.set_defaults(handler=_suite)

    report = sub.add_parser("report", help="re-render report.md and plots from results.json")
    report.add_argument("results", type=Path)
    report.add_argument("--out", type=Path, default=None)
    report.set_defaults(handler=_report)


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The workload and load flags of ``bench run`` (``pdserve simulate`` shares them)."""
    parser.add_argument("--workload", choices=WORKLOAD_KINDS, default="sharegpt")
    for name in _WORKLOAD_FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=f"w_{name}", type=_number(name))
    parser.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    parser.add_argument("--concurrency", type=int, default=4, help="closed loop (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="workload and arrival seed")
    parser.add_argument("--max-duration", type=float, default=300.0, help="no start after (s)")


def add_slo_args(parser: argparse.ArgumentParser) -> None:
    """The SLO flags of ``bench run`` (``pdserve simulate`` shares them)."""
    parser.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=200.0)
    parser.add_argument("--slo-max-itl-ms", type=float, default=None)
    parser.add_argument(
        "--slo-ttft-ms-per-1k", type=float, default=0.0, help="TTFT allowance per 1k prompt tokens"
    )


def slo_from_args(args: argparse.Namespace) -> Any:
    """The :class:`loadgen.summary.Slo` of :func:`add_slo_args`' flags."""
    from loadgen.summary import Slo

    return Slo(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_max_itl_ms, args.slo_ttft_ms_per_1k)


def _scenarios() -> tuple[str, ...]:
    from loadgen.suite import SCENARIOS

    return SCENARIOS


def _configs() -> tuple[str, ...]:
    from loadgen.stack import DISAGG_CONFIGS

    return tuple(DISAGG_CONFIGS)


def _number(name: str) -> type:
    field = next(f for f in dataclasses.fields(WorkloadSpec) if f.name == name)
    return float if field.type == "float" else int


def workload_from_args(args: argparse.Namespace) -> WorkloadSpec:
    values = {name: getattr(args, f"w_{name}") for name in _WORKLOAD_FLAGS}
    return WorkloadSpec(kind=args.workload, seed=args.seed).with_overrides(**values)


def load_from_args(args: argparse.Namespace, **extra: Any) -> Any:
    """The run's LoadSpec from :func:`add_workload_args`' flags (open loop when ``--rate``
    is given, else closed at ``--concurrency``); ``extra`` sets further LoadSpec fields.
    Raises ValueError for an invalid combination."""
    from loadgen.driver import LoadSpec

    return LoadSpec(
        mode="open" if args.rate else "closed",
        rate=args.rate or 1.0,
        concurrency=args.concurrency,
        seed=args.seed,
        max_duration_s=args.max_duration,
        drain_s=args.drain,
        **extra,
    )


def _run(args: argparse.Namespace) -> int:
    from loadgen.experiment import RunSpec, run_experiment
    from loadgen.summary import Slo
    from router.tokenizer import ModelTokenizer

    try:
        workload = workload_from_args(args)
        load = load_from_args(
            args, request_timeout_s=args.request_timeout, ignore_eos=_ignore_eos(args)
        )
    except ValueError as exc:
        print(f"pdserve bench: {exc}", file=sys.stderr)
        return 2
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_max_itl_ms, args.slo_ttft_ms_per_1k)
    tokenizer = ModelTokenizer.load(args.model_dir)
    spec = RunSpec(args.label or args.target, workload, load, slo, args.model)
    print(
        f"{workload.kind}: {workload.total_requests} requests, {load.describe()}", file=sys.stderr
    )
    result = run_experiment(args.target, spec, tokenizer)
    return _finish({"environment": _environment(), "runs": [result]}, args.out, "run")


def _ignore_eos(args: argparse.Namespace) -> bool:
    return args.target.startswith("grpc://") if args.ignore_eos is None else args.ignore_eos


def _suite(args: argparse.Namespace) -> int:
    from common.launch import exit_on_signals
    from loadgen.suite import Plan, run_suite
    from router.tokenizer import ModelTokenizer

    scenarios = [s for s in args.only.split(",") if s]
    unknown = set(scenarios) - set(_scenarios())
    if unknown:
        print(f"pdserve bench suite: unknown scenario(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    plan = Plan.quick() if args.quick else Plan()
    if args.configs:
        configs = tuple(c for c in args.configs.split(",") if c)
        unknown = set(configs) - set(_configs())
        if unknown:
            print(f"pdserve bench suite: unknown config(s) {sorted(unknown)}", file=sys.stderr)
            return 2
        plan = dataclasses.replace(plan, disagg_configs=configs)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="pdserve-bench-"))
    print(f"server logs in {log_dir}", file=sys.stderr)
    with exit_on_signals():
        results = run_suite(plan, scenarios, log_dir, ModelTokenizer.load(None))
    payload = {
        "environment": _environment(),
        "plan": dataclasses.asdict(plan),
        "scenarios": results,
    }
    return _finish(payload, args.out, "suite")


def _report(args: argparse.Namespace) -> int:
    results = json.loads(args.results.read_text())
    return _finish(results, args.out or args.results.parent, None)


def _finish(results: dict[str, Any], out: Path | None, default_name: str | None) -> int:
    from loadgen.report import disagg_table, run_table, write_report

    target = out or RESULTS_DIR / (default_name or "report")
    paths = write_report(results, target)
    runs = list(results.get("runs", []))
    for scenario in results.get("scenarios", {}).values():
        runs += scenario.get("runs", [])
    print("\n".join(run_table(runs)))
    for name, scenario in results.get("scenarios", {}).items():
        if name == "disagg":
            print("\n".join(["", *disagg_table(scenario), ""]))
        if scenario.get("skipped"):
            print(scenario["skipped"])
        if scenario.get("goals"):
            print(f"{name} goals: {json.dumps(scenario['goals'])}")
    print("wrote " + ", ".join(str(p) for p in paths))
    failed = sum(r["summary"]["failed"] for r in runs)
    return 1 if failed and failed == sum(r["summary"]["requests"] for r in runs) else 0


def _environment() -> dict[str, Any]:
    from loadgen.machine import environment_info

    return environment_info()
