"""``python -m benchmarks.engine``: the engine throughput benchmark (see the package doc)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import benchmarks.engine as package
from benchmarks._common import announce, bench_parser, save, use_checkout_defaults
from benchmarks.engine.report import print_goals, print_results, print_roofline
from benchmarks.engine.roofline import measure_bandwidth, roofline, weight_bytes
from benchmarks.engine.runner import Measurement, agreement, measurements, run_child, this_python
from benchmarks.engine.spec import DTYPE_ALIASES, DTYPES, ChildSpec
from benchmarks.engine.workloads import Plan, build_workloads, make_sampler, warmup_rounds
from loadgen.peers import Peer, vllm_environment, vllm_peer

SYSTEMS = ("ours", "vllm", "hf", "hf_static", "hf_cb")
DEFAULT_SYSTEMS = ("ours", "vllm")
REFERENCES = ("vllm", "hf")  # the first one measured is what the others' tokens are compared with


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = bench_parser(package.__doc__ or "", quick="small smoke-test workloads (a few minutes)")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads per system")
    p.add_argument("--model", help="local HF checkpoint dir (default: the converted SmolLM2)")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"comma list of {SYSTEMS}")
    p.add_argument("--dtypes", default="float32,bfloat16", help=f"comma list of {DTYPES}")
    p.add_argument("--skip-ours", action="store_true", help="benchmark only the baselines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache-gib", type=int, default=1, help="KV cache of ours and vLLM")
    p.add_argument("--timeout-s", type=float, default=1800, help="per system and dtype")
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
    args.dtypes = [DTYPE_ALIASES.get(d, d) for d in args.dtypes.split(",") if d]
    if set(args.dtypes) - set(DTYPES):
        p.error(f"unknown dtypes {args.dtypes}; choose from {DTYPES}")
    args.engine_arg = dict(_parse_kv(item, p) for item in args.engine_arg)
    if "dtype" in args.engine_arg:
        p.error("set the dtype with --dtypes, not --engine-arg")
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
            "must work, or run with --skip-ours to benchmark only the baselines"
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


def resolve_peer(args: argparse.Namespace) -> Peer:
    """The vLLM peer; drops ``vllm`` from the systems with a clear line when it is absent."""
    peer = vllm_peer()
    if "vllm" in args.systems and not peer.installed:
        print(f"{peer.missing_line()}; benchmarking without it", flush=True)
        args.systems = [s for s in args.systems if s != "vllm"]
    return peer


def compare_tokens(results: list[Measurement], tokens: dict[tuple[str, str], dict]) -> None:
    """Fill each row's greedy agreement with the reference system of the same dtype."""
    for m in results:
        ref = next((r for r in REFERENCES if (r, m.dtype) in tokens and r != m.system), None)
        if ref is None or m.workload not in tokens[(ref, m.dtype)]:
            continue
        got, want = tokens[(m.system, m.dtype)][m.workload], tokens[(ref, m.dtype)][m.workload]
        m.reference = ref
        m.exact_match_vs_ref, m.prefix_match_vs_ref = agreement(got, want)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    path = setup_environment(args)
    context = announce()  # after setup: it records the torch threads
    context["environment"]["threads"] = args.threads
    if "ours" in args.systems:
        check_engine_importable()
    peer = resolve_peer(args)
    plan = Plan.quick() if args.quick else Plan()
    if args.static_batch_size:
        plan = dataclasses.replace(plan, static_batch_size=args.static_batch_size)
    sampler = make_sampler(path, args.seed)
    workloads = tuple(build_workloads(plan, sampler))
    warmup = tuple(tuple(rnd) for rnd in warmup_rounds(plan, sampler))
    model_info = weight_bytes(path)
    bw = measure_bandwidth(plan.bandwidth_mib)

    systems: dict[str, Any] = {}
    results: list[Measurement] = []
    tokens: dict[tuple[str, str], dict] = {}
    for dtype in args.dtypes:
        for name in args.systems:
            spec = ChildSpec(
                system=name,
                dtype=dtype,
                threads=args.threads,
                model=str(path),
                plan=plan,
                workloads=workloads,
                warmup=warmup,
                kv_cache_gib=args.kv_cache_gib,
                engine_args=args.engine_arg if name == "ours" else {},
                cb_api=args.cb_api,
                cb_num_blocks=args.cb_num_blocks,
            )
            payload = run_system(spec, peer, args.timeout_s)
            systems[f"{name}/{dtype}"] = payload.get("info", payload)
            if "error" in payload:
                print(f"[{name} {dtype}] FAILED: {payload['error']}", flush=True)
                continue
            rows, tokens[(name, dtype)] = measurements(spec, payload)
            results += rows
            systems[f"{name}/{dtype}"]["peak_rss_bytes"] = payload["peak_rss_bytes"]
    compare_tokens(results, tokens)
    for m in results:
        if m.cached_tokens:
            print(
                f"warning: {m.system} {m.dtype} served {m.cached_tokens} prompt tokens from cache"
            )

    roof = roofline(model_info, bw, results)
    print_results(results)
    print_roofline(roof, bw)
    goals = print_goals(results, roof)
    payload = {
        **context,
        "load_average_end": list(os.getloadavg()),
        "model": {"path": str(path), **model_info},
        "peer": {"name": peer.name, "venv": str(peer.venv), "installed": peer.version()},
        "plan": asdict(plan),
        "dtypes": args.dtypes,
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


def run_system(spec: ChildSpec, peer: Peer, timeout_s: float) -> dict[str, Any]:
    """One system in its own process: the peer's Python for vLLM, this one otherwise."""
    if spec.system == "vllm":
        env = vllm_environment(spec.threads, spec.kv_cache_gib, in_process=True)
        return run_child(spec, peer.python, env, timeout_s)
    return run_child(spec, this_python(), {}, timeout_s)


if __name__ == "__main__":
    raise SystemExit(main())
