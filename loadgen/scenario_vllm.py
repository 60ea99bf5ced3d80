"""The ``vllm`` scenario: pdserve (1 prefill + 1 decode) vs ``vllm serve``, same machine.

For each dtype of ``Plan.vllm_dtypes`` (``None``: each system's own default), the same
seeded workload at the same open-loop rate goes to pdserve (through each API of
``Plan.vllm_pdserve_apis``: its gRPC API and/or its OpenAI HTTP API, each on a freshly
started stack so that neither run finds the other's prompts cached) and then to
``vllm serve`` started from the peer venv (``make bench-peers``) through its OpenAI API,
by the same client. Both get the two cores: our two workers one torch thread each, vLLM
two OpenMP threads. Without the peer the scenario runs nothing and says so (``skipped``).
Goals (issue 16): goodput >= 1.2x vLLM's, ITL p99 <= 0.7x, TTFT p50 no worse.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from loadgen.experiment import RunSpec, run_experiment
from loadgen.peer_stack import VLLMServe
from loadgen.peers import vllm_peer
from loadgen.stack import OurStack, StackSpec, disaggregated
from loadgen.suite import Plan, _ratio, _say, after_run, warm_up


def with_dtype(spec: StackSpec, dtype: str | None) -> StackSpec:
    """``spec`` with ``--dtype`` on every worker (None: the workers' default), renamed."""
    if dtype is None:
        return dataclasses.replace(spec, name=f"pdserve-{spec.name}-default")
    workers = tuple(dataclasses.replace(w, args=(*w.args, "--dtype", dtype)) for w in spec.workers)
    return dataclasses.replace(spec, name=f"pdserve-{spec.name}-{dtype}", workers=workers)


def vllm_scenario(plan: Plan, log_dir: Path, tokenizer: Any) -> dict[str, Any]:
    peer = vllm_peer()
    if not peer.installed:
        line = f"vllm scenario skipped: {peer.missing_line()}"
        _say(line)
        return {"runs": [], "skipped": line}
    runs: list[dict[str, Any]] = []
    load = plan.open_loop(plan.vllm_rate)
    for dtype in plan.vllm_dtypes:
        shown = dtype or "default"
        stack_spec = with_dtype(disaggregated(), dtype)
        for api in plan.vllm_pdserve_apis:
            # A fresh stack per API: the same seeded prompts would otherwise find the
            # previous API's run in the prefix cache, which vLLM's fresh server never gets.
            with OurStack(stack_spec, log_dir) as stack:
                warm_up(stack.url, tokenizer)
                url = stack.url if api == "grpc" else stack.http_url
                _say(f"-- pdserve 1P+1D ({api}, {shown}) at {plan.vllm_rate:g} req/s")
                spec = RunSpec(f"pdserve-{api}", plan.vllm_workload, load, plan.tight_slo)
                result = run_experiment(url, spec, tokenizer)
                runs.append({**result, "dtype": shown, "after": after_run(stack)})
        server = VLLMServe(peer, log_dir, dtype=dtype, threads=plan.vllm_threads)
        with server:
            warm_up(server.url, tokenizer, model=server.model)
            _say(f"-- vllm serve ({shown}) at {plan.vllm_rate:g} req/s")
            spec = RunSpec("vllm-serve", plan.vllm_workload, load, plan.tight_slo, server.model)
            runs.append({**run_experiment(server.url, spec, tokenizer), "dtype": shown})
    return {"runs": runs, "peer": peer.version(), "goals": vllm_goals(runs)}


def vllm_goals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dtype and pdserve API: the ratios against vllm-serve and whether each goal holds."""
    goals: dict[str, Any] = {}
    for dtype in dict.fromkeys(r["dtype"] for r in runs):
        by_label = {r["label"]: r["summary"] for r in runs if r["dtype"] == dtype}
        peer = by_label.get("vllm-serve")
        if peer is None:
            continue
        for label, ours in by_label.items():
            if label == "vllm-serve":
                continue
            goodput = _ratio(ours["goodput_req_s"], peer["goodput_req_s"])
            itl = _ratio(ours["itl_ms"]["p99"], peer["itl_ms"]["p99"])
            ttft = _ratio(ours["ttft_ms"]["p50"], peer["ttft_ms"]["p50"])
            goals[f"{label}/{dtype}"] = {
                "goodput_ratio": goodput,
                "goodput_met": goodput is not None and goodput >= 1.2,
                "itl_p99_ratio": itl,
                "itl_p99_met": itl is not None and itl <= 0.7,
                "ttft_p50_ratio": ttft,
                "ttft_p50_met": ttft is not None and ttft <= 1.0,
            }
    return goals
