"""``python -m benchmarks.engine``: the engine throughput benchmark (see the package doc)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import benchmarks.engine as package
from benchmarks._common import announce, bench_parser, save, use_checkout_defaults
from benchmarks.engine.report import print_report
from benchmarks.engine.roofline import measure_bandwidth, roofline, weight_bytes
from benchmarks.engine.runner import Measurement, agreement, benchmark_system
from benchmarks.engine.systems import make_system
from benchmarks.engine.workloads import Plan, build_workloads, make_sampler, warmup_rounds

SYSTEMS = ("hf", "hf_static", "hf_cb", "ours")
REFERENCE_SYSTEM = "hf"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = bench_parser(package.__doc__ or "", quick="small smoke-test workloads (<1 min)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--model", help="local HF checkpoint dir (default: the converted SmolLM2)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of " + str(SYSTEMS))
    p.add_argument("--skip-ours", action="store_true", help="benchmark only the HF baselines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--static-batch-size", type=int, help="hf_static batch size (default 8)")
    p.add_argument("--cb-api", choices=("manager", "generate_batch"), default="manager")
    p.add_argument(
        "--cb-num-blocks",
        type=int,
        help="hf_cb KV pages (default: enough for every request at once; 0: transformers' own)",
    )
    p.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra EngineConfig field for ours (repeatable)",
    )
    args = p.parse_args(argv)
    skipped = {"ours"} if args.skip_ours else set()
    args.systems = [s for s in args.systems.split(",") if s and s not in skipped]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    args.engine_arg = dict(_parse_kv(item, p) for item in args.engine_arg)
    return args


def _parse_kv(item: str, parser: argparse.ArgumentParser) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep:
        parser.error(f"--engine-arg wants KEY=VALUE, got {item!r}")
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def check_engine_importable() -> None:
    try:
        from engine import LLM, SamplingParams  # noqa: F401
    except ImportError as exc:
        sys.exit(
            f"our engine is not importable ({exc}); `from engine import LLM, SamplingParams` "
            "must work, or run with --skip-ours to benchmark only the HF baselines"
        )


def setup_environment(args: argparse.Namespace) -> Path:
    """Offline defaults, threads, and the checkpoint every system loads."""
    use_checkout_defaults()
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    from engine.model_loader import ensure_default_model, resolve_model

    return ensure_default_model() if args.model is None else resolve_model(args.model).path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    path = setup_environment(args)
    context = announce()  # after setup: it records the torch threads
    context["environment"]["threads"] = args.threads
    if "ours" in args.systems:
        check_engine_importable()
    plan = Plan.quick() if args.quick else Plan()
    if args.static_batch_size:
        plan = dataclasses.replace(plan, static_batch_size=args.static_batch_size)
    sampler = make_sampler(path, args.seed)
    workloads = build_workloads(plan, sampler)
    warmup = warmup_rounds(plan, sampler)

    model_info = weight_bytes(path)
    bw = measure_bandwidth(plan.bandwidth_mib)
    systems: dict[str, Any] = {}
    results: list[Measurement] = []
    outputs: dict[str, dict[str, list[list[int]]]] = {}
    for name in args.systems:
        try:
            info, measured, outs = benchmark_system(
                name, lambda name=name: make_system(name, args, plan, path), workloads, warmup
            )
        except Exception as exc:  # keep the other systems' numbers; fail at the end
            traceback.print_exc()
            systems[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        systems[name], outputs[name] = info, outs
        results += measured
    if REFERENCE_SYSTEM in outputs:
        for m in results:
            ref = outputs[REFERENCE_SYSTEM][m.workload]
            got = outputs[m.system][m.workload]
            m.exact_match_vs_ref, m.prefix_match_vs_ref = agreement(got, ref)
    for m in results:
        if m.cached_tokens:
            print(f"warning: {m.system} served {m.cached_tokens} prompt tokens from cache")

    roof = roofline(model_info, bw, results)
    goals = print_report(results, roof, model_info, bw)
    payload = {
        **context,
        "load_average_end": list(os.getloadavg()),
        "model": {"path": str(path), **model_info},
        "plan": asdict(plan),
        "seed": args.seed,
        "bandwidth": bw,
        "roofline": roof,
        "systems": systems,
        "workloads": {
            w.name: [
                [{"prompt_len": len(r.prompt), "max_new_tokens": r.max_new_tokens} for r in rnd]
                for rnd in w.rounds
            ]
            for w in workloads
        },
        "results": [m.to_json() for m in results],
        "goals": goals,
        "total_s": time.perf_counter() - started,
    }
    save("engine_throughput", payload, args)
    print(f"({payload['total_s']:.0f} s total)")
    failed = [name for name, info in systems.items() if "error" in info]
    if failed:
        print(f"FAILED systems: {', '.join(failed)} (see the tracebacks above)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
