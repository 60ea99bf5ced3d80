"""Measuring one system: set it up, warm it up, time every round of every workload, and
check each output's length; :func:`agreement` compares outputs with the ``hf`` reference.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks._common import median, timed
from benchmarks.engine.systems import RunOutput, System
from benchmarks.engine.workloads import Request, Workload

SKIPPED = {("hf_static", "batch1")}  # a static batch of one is exactly hf


@dataclass(slots=True)
class Measurement:
    system: str
    workload: str
    num_requests: int
    useful_tokens: int  # output tokens the requests asked for, per repeat
    computed_tokens: int  # output tokens the system decoded, per repeat
    prompt_tokens: int
    wall_s: list[float] = field(default_factory=list)  # one per repeat
    ttft_s: list[float] = field(default_factory=list)  # batch1: 1-token runs
    cached_tokens: int = 0
    exact_match_vs_ref: float | None = None  # fraction of requests equal to the hf output
    prefix_match_vs_ref: float | None = None  # mean matching-prefix share of each output

    @property
    def wall(self) -> float:
        return median(self.wall_s)

    @property
    def tok_s(self) -> float:
        return self.useful_tokens / self.wall

    @property
    def ttft(self) -> float | None:
        return median(self.ttft_s) if self.ttft_s else None

    @property
    def tpot(self) -> float | None:
        """Median over rounds of (wall - TTFT) / (tokens - 1); None if noise made it <= 0."""
        if not self.ttft_s or self.useful_tokens < 2:
            return None
        pairs = zip(self.wall_s, self.ttft_s, strict=True)
        per_round = [(wall - ttft) / (self.useful_tokens - 1) for wall, ttft in pairs]
        value = median(per_round)
        return value if value > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "wall_median_s": self.wall,
            "tok_s": self.tok_s,
            "ttft_median_s": self.ttft,
            "tpot_s": self.tpot,
        }


def run_workload(system: System, workload: Workload) -> tuple[Measurement, list[list[int]]]:
    """Time every round of ``workload`` on ``system`` (plus its 1-token TTFT runs)."""
    first = workload.rounds[0]
    m = Measurement(
        system=system.name,
        workload=workload.name,
        num_requests=len(first),
        useful_tokens=sum(r.max_new_tokens for r in first),
        computed_tokens=0,
        prompt_tokens=sum(len(r.prompt) for r in first),
    )
    tokens: list[list[int]] = []
    for i, requests in enumerate(workload.rounds):
        if i < len(workload.ttft_prompts):
            probe = [Request(workload.ttft_prompts[i], 1)]
            m.ttft_s.append(timed_run(system, probe)[1])
        out, wall = timed_run(system, requests)
        m.wall_s.append(wall)
        m.computed_tokens = out.computed_tokens
        m.cached_tokens += out.cached_tokens
        tokens += out.tokens
    return m, tokens


def timed_run(system: System, requests: Sequence[Request]) -> tuple[RunOutput, float]:
    out, wall = timed(lambda: system.generate(requests))
    check_lengths(system.name, requests, out)
    return out, wall


def _secs(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values) + " s"


def check_lengths(name: str, requests: Sequence[Request], out: RunOutput) -> None:
    if len(out.tokens) != len(requests):
        raise RuntimeError(f"{name}: {len(out.tokens)} outputs for {len(requests)} requests")
    for i, (toks, r) in enumerate(zip(out.tokens, requests, strict=True)):
        if len(toks) != r.max_new_tokens:
            raise RuntimeError(
                f"{name}: request {i} got {len(toks)} tokens, asked for {r.max_new_tokens}"
            )


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(share of identical outputs, mean share of each output matching before divergence)."""
    exact, prefix = 0, 0.0
    for got, want in zip(outputs, reference, strict=True):
        same = next(
            (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), len(want)
        )
        exact += same == len(want)
        prefix += same / max(len(want), 1)
    return exact / len(reference), prefix / len(reference)


def benchmark_system(
    name: str,
    make: Callable[[], System],
    workloads: Sequence[Workload],
    warmup: list[list[Request]],
) -> tuple[dict[str, Any], list[Measurement], dict[str, list[list[int]]]]:
    system, setup_s = timed(make)
    try:
        warm_s = [timed_run(system, requests)[1] for requests in warmup]
        print(f"[{name}] set up in {setup_s:.1f} s, warm-up rounds {_secs(warm_s)}", flush=True)
        info = {"setup_s": setup_s, "warmup_s": warm_s, **system.describe()}
        results, outputs = [], {}
        for workload in workloads:
            if (name, workload.name) in SKIPPED:
                continue
            m, tokens = run_workload(system, workload)
            results.append(m)
            outputs[workload.name] = tokens
            print(
                f"[{name}] {workload.name}: {m.tok_s:.1f} tok/s, walls {_secs(m.wall_s)}",
                flush=True,
            )
    finally:
        system.close()
        gc.collect()
    return info, results, outputs
