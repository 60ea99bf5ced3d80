"""One system in its own process: ``python -m benchmarks.engine.child SPEC OUT``.

Lifecycle: read the :class:`~benchmarks.engine.spec.ChildSpec`, set the threads, build the
system (timed), run the untimed warm-up rounds, then time every round of every workload
(each batch-1 round after a 1-token TTFT probe), check every output's length, and write
the tokens, wall times, peak RSS and the system's description to OUT as JSON. An engine
per process keeps one system's memory, threads and compiled kernels from touching the
next one's, and lets vLLM run from its own venv. Stdlib (+ the system's own packages)
only: the peer's Python runs this module with the checkout on ``PYTHONPATH``.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.engine.spec import ChildSpec
from benchmarks.engine.systems import RunOutput, System, make_system
from benchmarks.engine.workloads import Request, Workload

SKIPPED = {("hf_static", "batch1")}  # a static batch of one is exactly hf


def timed_run(system: System, requests: Sequence[Request]) -> tuple[RunOutput, float]:
    start = time.perf_counter()
    out = system.generate(requests)
    wall = time.perf_counter() - start
    check_lengths(system.name, requests, out)
    return out, wall


def check_lengths(name: str, requests: Sequence[Request], out: RunOutput) -> None:
    if len(out.tokens) != len(requests):
        raise RuntimeError(f"{name}: {len(out.tokens)} outputs for {len(requests)} requests")
    for i, (toks, r) in enumerate(zip(out.tokens, requests, strict=True)):
        if len(toks) != r.max_new_tokens:
            raise RuntimeError(
                f"{name}: request {i} got {len(toks)} tokens, asked for {r.max_new_tokens}"
            )


def run_workload(system: System, workload: Workload) -> dict[str, Any]:
    """Time every round of ``workload`` (plus its 1-token TTFT probes)."""
    result: dict[str, Any] = {"workload": workload.name, "wall_s": [], "ttft_s": []}
    tokens: list[list[int]] = []
    cached = computed = 0
    for i, requests in enumerate(workload.rounds):
        if i < len(workload.ttft_prompts):
            probe = [Request(workload.ttft_prompts[i], 1)]
            result["ttft_s"].append(timed_run(system, probe)[1])
        out, wall = timed_run(system, requests)
        result["wall_s"].append(wall)
        computed = out.computed_tokens
        cached += out.cached_tokens
        tokens += out.tokens
    result.update(tokens=tokens, computed_tokens=computed, cached_tokens=cached)
    return result


def peak_rss_bytes() -> dict[str, int]:
    """Peak resident set of this process and of its largest waited-for child (Linux: KiB)."""
    return {
        "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }


def run(spec: ChildSpec) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec.threads)
    start = time.perf_counter()
    system = make_system(spec)
    setup_s = time.perf_counter() - start
    label = f"[{spec.system} {spec.dtype}]"
    try:
        warm_s = [timed_run(system, list(rnd))[1] for rnd in spec.warmup]
        shown = ", ".join(f"{w:.2f}" for w in warm_s)
        print(f"{label} set up in {setup_s:.1f} s, warm-up rounds {shown} s", flush=True)
        results = []
        for workload in spec.workloads:
            if (spec.system, workload.name) in SKIPPED:
                continue
            results.append(run_workload(system, workload))
            walls = ", ".join(f"{w:.2f}" for w in results[-1]["wall_s"])
            print(f"{label} {workload.name}: walls {walls} s", flush=True)
        info = {"setup_s": setup_s, "warmup_s": warm_s, **system.describe()}
    finally:
        system.close()
        gc.collect()
    return {"info": info, "results": results, "peak_rss_bytes": peak_rss_bytes()}


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m benchmarks.engine.child SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = ChildSpec.read(Path(argv[0]))
    try:
        payload = run(spec)
    except Exception as exc:  # the parent keeps the other systems' numbers
        traceback.print_exc()
        payload = {"error": f"{type(exc).__name__}: {exc}"}
    Path(argv[1]).write_text(json.dumps(payload))
    return 1 if "error" in payload else 0


if __name__ == "__main__":  # the guard vLLM's offline LLM needs (it may spawn)
    raise SystemExit(main(sys.argv[1:]))
