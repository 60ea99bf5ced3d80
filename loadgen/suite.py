"""The comparisons behind `pdserve bench suite`: each starts its stacks, runs, tears down.

    disagg   1 prefill + 1 decode vs 2 colocated workers, on short chats with long prompts
             mixed in, open loop at a sweep of rates (goodput vs rate, TTFT / ITL CDFs);
             opt-in configurations beside them (``Plan.disagg_configs``): colocated with a
             256-token step budget, disaggregated with page-first KV caches
    routing  prefix_aware vs round_robin vs least_loaded, 2 prefill workers (small prefix
             caches) + 1 decode, on the shared-prefix and multi-turn workloads
    peer     pdserve (router + 1 colocated worker) vs `transformers serve`, same model,
             same client (OpenAI HTTP for the peer), ShareGPT-like closed loop
    vllm     pdserve 1P+1D vs `vllm serve` from the peer venv (`make bench-peers`), in fp32
             and the default dtype, same workload and client (:mod:`scenario_vllm`);
             skipped with a clear line when the peer is not installed
    overload 1P+1D at 3x its sustainable rate: admitted TTFT p99 vs unloaded, refusals
             (RESOURCE_EXHAUSTED / 429) and their latency (:mod:`scenario_overload`)

Every stack of a comparison gets the same workloads (same seeds), the same load and a short
warm-up first; stacks run one after another on this machine, never at the same time. Runs
on one stack never repeat a prompt (each rate of a sweep has its own seed), so no run is
served from an earlier run's prefix cache.
``Plan.quick()`` shrinks every count so the whole suite is a smoke test of a few minutes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadgen.driver import LoadSpec
from loadgen.experiment import RunSpec, run_experiment
from loadgen.machine import load_average
from loadgen.stack import (
    DISAGG_CONFIGS,
    OurStack,
    TransformersServe,
    colocated,
    two_prefill,
)
from loadgen.summary import Slo
from loadgen.workload import WorkloadSpec

SCENARIOS = ("disagg", "routing", "peer", "vllm", "overload")
POLICIES = ("prefix_aware", "round_robin", "least_loaded")


@dataclass(frozen=True, slots=True)
class Plan:
    """Sizes of every comparison (defaults: the full run, about 15 minutes on 2 cores)."""

    rates: tuple[float, ...] = (0.25, 0.5, 1.0)  # disagg sweep, requests/s
    headline_rate: float = 0.5  # the rate whose CDFs and ratios are the headline
    # stack.DISAGG_CONFIGS, in order; the goals compare the first two
    disagg_configs: tuple[str, ...] = ("disaggregated", "colocated")
    mixed: WorkloadSpec = field(
        default_factory=lambda: WorkloadSpec(
            kind="mixed_long", num_requests=24, short_tokens=96, output_tokens=32,
            long_tokens=1536, long_every=6, long_output_tokens=16, seed=1,
        )
    )  # fmt: skip
    # TTFT 1.5 s + 4 s per 1k prompt tokens (a 1.5k prompt prefills in ~5.5 s on one core)
    tight_slo: Slo = field(
        default_factory=lambda: Slo(
            ttft_ms=1500, tpot_ms=150, max_itl_ms=300, ttft_ms_per_1k_tokens=4000
        )
    )
    shared_prefix: WorkloadSpec = field(
        default_factory=lambda: WorkloadSpec(
            kind="shared_prefix", groups=6, prompts_per_group=6, prefix_tokens=640,
            question_tokens=32, output_tokens=8, seed=2,
        )
    )  # fmt: skip
    shared_prefix_rate: float = 1.0
    multi_turn: WorkloadSpec = field(
        default_factory=lambda: WorkloadSpec(
            kind="multi_turn", conversations=6, turns=4, turn_tokens=96, output_tokens=24,
            seed=3,
        )
    )  # fmt: skip
    multi_turn_rate: float = 0.5
    prefill_kv_blocks: int = 192  # per prefill worker in `routing`: ~4 of the 6 prefixes fit
    routing_slo: Slo = field(default_factory=lambda: Slo(ttft_ms=1000, tpot_ms=200))
    sharegpt: WorkloadSpec = field(
        default_factory=lambda: WorkloadSpec(kind="sharegpt", num_requests=16, seed=4)
    )
    peer_concurrency: int = 4
    peer_slo: Slo = field(default_factory=lambda: Slo(ttft_ms=2000, tpot_ms=200))
    # vllm: the comparison (`pdserve bench run --workload mixed_long --rate 0.5
    # --num-requests 40`); None in vllm_dtypes is each system's default dtype
    vllm_workload: WorkloadSpec = field(
        default_factory=lambda: WorkloadSpec(kind="mixed_long", num_requests=40, seed=5)
    )
    vllm_rate: float = 0.5
    vllm_dtypes: tuple[str | None, ...] = ("float32", None)
    vllm_pdserve_apis: tuple[str, ...] = ("grpc", "http")
    vllm_threads: int = 2
    # overload: short chats; the sustainable rate is measured unless given
    overload_workload: WorkloadSpec = field(
        default_factory=lambda: WorkloadSpec(
            kind="fixed", input_tokens=96, output_tokens=32, seed=6
        )
    )
    overload_unloaded_requests: int = 12
    overload_probe_requests: int = 24
    overload_probe_concurrency: int = 4
    overload_rate: float | None = None  # req/s the stack sustains; None: the probe's
    overload_factor: float = 3.0
    overload_duration_s: float = 60.0
    overload_slo: Slo = field(default_factory=lambda: Slo(ttft_ms=2000, tpot_ms=200))
    # the router pool's admission bounds in `overload` (router.admission); None: its defaults
    overload_max_in_flight: int | None = 4
    overload_max_queued: int | None = 4
    overload_max_queue_wait_s: float | None = 0.25  # queue only what starts within this
    max_duration_s: float = 240.0
    drain_s: float = 120.0

    @classmethod
    def quick(cls) -> Plan:
        full = cls()
        return cls(
            rates=(0.5,),
            headline_rate=0.5,
            mixed=full.mixed.with_overrides(num_requests=6, long_tokens=512, long_every=3),
            shared_prefix=full.shared_prefix.with_overrides(
                groups=2, prompts_per_group=3, prefix_tokens=128
            ),
            multi_turn=full.multi_turn.with_overrides(conversations=2, turns=2, output_tokens=8),
            prefill_kv_blocks=256,
            sharegpt=full.sharegpt.with_overrides(num_requests=4, max_output_tokens=16),
            peer_concurrency=2,
            vllm_workload=full.vllm_workload.with_overrides(num_requests=4, long_tokens=512),
            vllm_rate=1.0,
            vllm_pdserve_apis=("http",),
            overload_unloaded_requests=3,
            overload_probe_requests=4,
            overload_probe_concurrency=2,
            overload_duration_s=10.0,
            max_duration_s=60.0,
            drain_s=60.0,
        )

    def open_loop(self, rate: float) -> LoadSpec:
        return LoadSpec(
            mode="open", rate=rate, max_duration_s=self.max_duration_s, drain_s=self.drain_s
        )


def run_suite(
    plan: Plan, scenarios: Sequence[str], log_dir: Path, tokenizer: Any
) -> dict[str, Any]:
    from loadgen.scenario_overload import overload_scenario  # they import this module
    from loadgen.scenario_vllm import vllm_scenario

    runners: dict[str, Callable[[Plan, Path, Any], dict[str, Any]]] = {
        "disagg": disagg_scenario,
        "routing": routing_scenario,
        "peer": peer_scenario,
        "vllm": vllm_scenario,
        "overload": overload_scenario,
    }
    results = {}
    for name in scenarios:
        _say(f"== scenario {name}")
        results[name] = runners[name](plan, log_dir, tokenizer)
    return results


# --------------------------------------------------------------------------- disagg


def disagg_scenario(plan: Plan, log_dir: Path, tokenizer: Any) -> dict[str, Any]:
    runs = []
    for config in plan.disagg_configs:
        stack_spec = DISAGG_CONFIGS[config]()
        with OurStack(stack_spec, log_dir) as stack:
            warm_up(stack.url, tokenizer)
            for index, rate in enumerate(plan.rates):
                _say(f"-- {stack_spec.name} at {rate:g} req/s")
                # fresh prompts per rate: a repeat would be served from the prefix cache
                workload = plan.mixed.with_overrides(seed=plan.mixed.seed + 100 * index)
                spec = RunSpec(stack_spec.name, workload, plan.open_loop(rate), plan.tight_slo)
                result = run_experiment(stack.url, spec, tokenizer)
                runs.append({**result, "rate": rate, "after": after_run(stack)})
    return {"runs": runs, "goals": disagg_goals(runs, plan.headline_rate)}


def after_run(stack: OurStack) -> dict[str, Any]:
    """What a run left behind: dead processes, each worker's blocks once idle (used
    blocks would be a leak), the load average (a busy machine makes noisy numbers)."""
    return {
        "dead": stack.dead(),
        "worker_status": stack.worker_status(),
        "load_average": load_average(),
    }


def disagg_goals(runs: Sequence[dict[str, Any]], rate: float) -> dict[str, Any]:
    """Disaggregated vs colocated at the headline ``rate``: p99 ITL <= 0.5x and goodput
    >= 1.3x colocated's; the p99 ITL ratio against every other configuration run; the
    highest swept rate at which each still meets the SLO."""

    def at(label: str) -> dict[str, Any] | None:
        found = [r["summary"] for r in runs if r["label"] == label and r["rate"] == rate]
        return found[0] if found else None

    disagg, coloc = at("disaggregated"), at("colocated")
    if disagg is None or coloc is None:
        return {}
    itl = _ratio(disagg["itl_ms"]["p99"], coloc["itl_ms"]["p99"])
    goodput = _ratio(disagg["goodput_req_s"], coloc["goodput_req_s"])
    labels = list(dict.fromkeys(r["label"] for r in runs))
    others = {label: at(label) for label in labels if label != "disaggregated"}
    return {
        "rate": rate,
        "p99_itl_ratio": itl,
        "p99_itl_goal": "<= 0.5",
        "p99_itl_met": itl is not None and itl <= 0.5,
        "goodput_ratio": goodput,
        "goodput_goal": ">= 1.3",
        "goodput_met": goodput is not None and goodput >= 1.3,
        "p99_itl_ratio_vs": {
            label: _ratio(disagg["itl_ms"]["p99"], other["itl_ms"]["p99"])
            for label, other in others.items()
            if other is not None
        },
        "max_rate_meeting_slo": {label: max_rate_meeting(runs, label) for label in labels},
    }


def max_rate_meeting(runs: Sequence[dict[str, Any]], label: str, attainment: float = 0.9):
    """The highest swept rate at which >= ``attainment`` of requests met the SLO."""
    rates = [
        r["rate"]
        for r in runs
        if r["label"] == label and (r["summary"]["slo_attainment"] or 0) >= attainment
    ]
    return max(rates) if rates else None


# --------------------------------------------------------------------------- routing


def routing_scenario(plan: Plan, log_dir: Path, tokenizer: Any) -> dict[str, Any]:
    runs = []
    workloads = (
        (plan.shared_prefix, plan.shared_prefix_rate),
        (plan.multi_turn, plan.multi_turn_rate),
    )
    for policy in POLICIES:
        stack_spec = two_prefill(policy, plan.prefill_kv_blocks)
        with OurStack(stack_spec, log_dir) as stack:
            warm_up(stack.url, tokenizer)
            for workload, rate in workloads:
                _say(f"-- {policy} on {workload.kind}")
                spec = RunSpec(policy, workload, plan.open_loop(rate), plan.routing_slo)
                runs.append({**run_experiment(stack.url, spec, tokenizer), "rate": rate})
    return {"runs": runs, "goals": routing_goals(runs)}


def routing_goals(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    goals = {}
    for kind in ("shared_prefix", "multi_turn"):
        by_policy = {r["label"]: r["summary"] for r in runs if r["workload"]["kind"] == kind}
        aware, rr = by_policy.get("prefix_aware"), by_policy.get("round_robin")
        if aware is None or rr is None:
            continue
        ttft = _ratio(aware["ttft_ms"]["p50"], rr["ttft_ms"]["p50"])
        goals[kind] = {
            "hit_of_best": aware["hit_of_best"],
            "hit_goal": ">= 0.9",
            "hit_met": (aware["hit_of_best"] or 0) >= 0.9,
            "ttft_p50_ratio_vs_round_robin": ttft,
            "ttft_goal": "<= 0.5",
            "ttft_met": ttft is not None and ttft <= 0.5,
        }
    return goals


# --------------------------------------------------------------------------- peer


def peer_scenario(plan: Plan, log_dir: Path, tokenizer: Any) -> dict[str, Any]:
    load = LoadSpec(
        mode="closed",
        concurrency=plan.peer_concurrency,
        max_duration_s=plan.max_duration_s,
        drain_s=plan.drain_s,
        ignore_eos=False,  # the peer rejects the field; greedy + EOS gives both equal lengths
    )
    runs = []
    with OurStack(colocated(1), log_dir) as stack:
        warm_up(stack.url, tokenizer)
        _say("-- pdserve (1 colocated worker)")
        spec = RunSpec("pdserve", plan.sharegpt, load, plan.peer_slo)
        runs.append(run_experiment(stack.url, spec, tokenizer))
    try:
        with TransformersServe(log_dir) as peer:
            warm_up(peer.url, tokenizer, model=peer.model)
            _say("-- transformers serve")
            spec = RunSpec("transformers serve", plan.sharegpt, load, plan.peer_slo, peer.model)
            runs.append(run_experiment(peer.url, spec, tokenizer))
    except (RuntimeError, TimeoutError) as exc:  # "where it runs": say why it did not
        return {"runs": runs, "peer_error": str(exc)[-2000:]}
    return {"runs": runs}


# --------------------------------------------------------------------------- helpers


def warm_up(url: str, tokenizer: Any, model: str = "") -> None:
    """Two small requests, one after the other, so first-call costs stay out of the run.

    Their prompts share no KV block (each its own system prompt), so the router's cost
    ties and its fewest-routed tie-break send them to different workers of a two-worker
    pool: both get warm, and the router's per-worker counts stay even, as a fresh router's
    are (what `pdserve simulate` starts from)."""
    workload = WorkloadSpec(
        kind="shared_prefix", groups=2, prompts_per_group=1, prefix_tokens=48,
        question_tokens=16, output_tokens=4, seed=99,
    )  # fmt: skip
    load = LoadSpec(
        mode="closed", concurrency=1, max_duration_s=120, progress=False, ignore_eos=False
    )
    result = run_experiment(url, RunSpec("warm-up", workload, load, model=model), tokenizer)
    if result["summary"]["failed"]:
        raise RuntimeError(f"warm-up against {url} failed: {result['summary']['errors']}")


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
