"""Per-request overheads end to end, for a profile (``pdserve profile --e2e``).

The step tables price the engine's work; a real request also pays the router
(tokenize, chat template, hashing, stream set-up), the decode worker's admission and
block reservation, the prefill worker's queues, the KV handshake and landing, and the
token stream back, all in Python processes that share the machine. This runs a real
1P+1D stack (loadgen/stack.py: redis-server, a prefill and a decode worker with the
profiled engine options and threads, 1024 KV blocks each, the router), sends
``requests`` short requests one at a time (closed loop, concurrency 1, so nothing
queues), and keeps what the tables do not explain:

- ``prefill_step_overhead_s``: median of TTFT - prefill_s(prompt) - router decision -
  2 x rpc_s (the simulator charges those already), clamped at 0. The prompts are short
  (one prefill step each), so it is charged per prefill step (capacity/cost_model.py);
- ``decode_step_overhead_s``: median inter-token gap - decode_step_s(1, context), clamped
  at 0, charged per decode step;
- ``e2e_ttft_s`` / ``e2e_itl_s``: the raw medians, for reference.

About 30 s on the 2-core VM (the stack starts its processes in parallel).
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capacity.cost_model import CostModel
from capacity.profile import Profile

if TYPE_CHECKING:
    from loadgen.stack import StackSpec

E2E_KEYS = ("prefill_step_overhead_s", "decode_step_overhead_s", "e2e_ttft_s", "e2e_itl_s")
PROMPT_TOKENS = 128
OUTPUT_TOKENS = 16


def e2e_overheads(
    profile: Profile, engine: dict[str, Any] | None = None, requests: int = 6
) -> dict[str, float]:
    """Measure on a real 1P+1D stack whose workers run ``profile``'s engine options (and
    ``engine["model"]``, a checkpoint path, if given); seconds by name (module docstring)."""
    from loadgen.driver import LoadSpec
    from loadgen.experiment import RunSpec, run_experiment
    from loadgen.stack import OurStack
    from loadgen.suite import warm_up
    from loadgen.workload import WorkloadSpec
    from router.tokenizer import ModelTokenizer

    model = (engine or {}).get("model")
    tokenizer = ModelTokenizer.load(model)
    workload = WorkloadSpec(
        kind="fixed",
        num_requests=requests,
        input_tokens=PROMPT_TOKENS,
        output_tokens=OUTPUT_TOKENS,
        seed=7,
    )
    load = LoadSpec(mode="closed", concurrency=1, max_duration_s=300, progress=False)
    log_dir = Path(tempfile.mkdtemp(prefix="pdserve-profile-e2e-"))
    with OurStack(stack_spec(profile, model), log_dir) as stack:
        warm_up(stack.url, tokenizer)
        result = run_experiment(stack.url, RunSpec("profile-e2e", workload, load), tokenizer)
    records = [r for r in result["records"] if r.get("ttft_s") is not None and not r.get("error")]
    if not records:
        raise RuntimeError(f"e2e overhead: no request completed ({result['summary']['errors']})")
    return overheads_from_records(profile, records)


def stack_spec(profile: Profile, model: str | None) -> StackSpec:
    """1P+1D as in loadgen.stack.disaggregated, with the profiled engine options."""
    from common.server_process import WorkerSpec
    from loadgen.stack import StackSpec

    engine = profile.engine
    threads = int(engine.get("num_threads") or 1)
    flags = [
        "--num-threads", str(threads),
        "--num-kv-blocks", "1024",
        "--dtype", profile.dtype,
        "--block-size", str(profile.block_size),
    ]  # fmt: skip
    for key in ("max_num_batched_tokens", "max_num_seqs", "kv_cache_dtype", "quantization"):
        if key in engine:
            flags += [f"--{key.replace('_', '-')}", str(engine[key])]
    if model:
        flags += ["--model", model]
    decode = ("--prefill-timeout", "600", "--on-prefill-failure", "fail", "--layer-wise")
    workers = (
        WorkerSpec("prefill_worker", "prefill-0", tuple(flags), threads),
        WorkerSpec("decode_worker", "decode-0", (*flags, *decode), threads),
    )
    return StackSpec("profile-e2e", workers, "prefix_aware")


def overheads_from_records(profile: Profile, records: list[dict]) -> dict[str, float]:
    """The overheads from request records (``ttft_s``, ``itls_s``, ``prompt_tokens``,
    ``cached_tokens``) against ``profile``'s tables: pure, unit-tested."""
    raw = {k: v for k, v in profile.overheads.items() if k not in E2E_KEYS}
    cost = CostModel(replace(profile, overheads=raw))  # the engine's tables alone
    fixed = cost.router_decision_s() + 2 * cost.overhead_s("rpc_s")
    ttft_excess, gaps, itl_excess = [], [], []
    for record in records:
        prompt = record.get("prompt_tokens") or PROMPT_TOKENS
        cached = record.get("cached_tokens") or 0
        ttft_excess.append(record["ttft_s"] - cost.prefill_s(prompt - cached, cached) - fixed)
        for k, gap in enumerate(record.get("itls_s") or []):
            gaps.append(gap)
            itl_excess.append(gap - cost.decode_step_s(1, prompt + k + 1))
    out = {
        "prefill_step_overhead_s": max(statistics.median(ttft_excess), 0.0),
        "e2e_ttft_s": statistics.median(r["ttft_s"] for r in records),
    }
    if gaps:
        out["decode_step_overhead_s"] = max(statistics.median(itl_excess), 0.0)
        out["e2e_itl_s"] = statistics.median(gaps)
    return out
