"""The simulator's speed-ups change nothing: the scheduler's cut-short queue walk against
the full walk, stopping early against whole runs, and the planner's answers with both."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from capacity.plan import PlanOptions, plan
from capacity.plan_eval import SimEvaluator, miss_limit
from capacity.plan_types import COLOCATED, DISAGG, Candidate, Guess, Slo
from capacity.serve_yaml import DEFAULT_CONFIG
from capacity.sim import SimOptions, SimRequest, simulate
from capacity.sim.job import Job
from capacity.sim.replica import EngineReplica
from capacity.trace import synthesize_chain
from capacity.traffic import Traffic
from loadgen.summary import Slo as RecordSlo
from tests.unit.sim_helpers import colocated, disagg, profile

ROOT = Path(__file__).resolve().parents[2]


def _full_walk(self: EngineReplica) -> list[tuple[Job, int]]:
    """The scheduler's two passes walking the whole queue (the code before the cut-short
    walk), kept here as the reference."""
    policy = self.policy
    left = self.budget - self.num_running
    seqs = self.max_seqs - self.num_running
    long_in_progress = any(j.scheduled and policy.is_long(j.remaining) for j in self.waiting)
    chunks: dict[Job, int] = {}
    blocked = False
    for job in self.waiting:
        if left <= 0 or seqs <= 0:
            break
        if not job.scheduled:
            if blocked or not policy.may_admit(job.remaining, long_in_progress):
                continue
            if not self._allocate(job):
                blocked = True
                continue
            long_in_progress = long_in_progress or policy.is_long(job.remaining)
        n = policy.first_chunk(job.remaining, left)
        if n > 0:
            chunks[job] = n
            left -= n
            seqs -= 1
    for job in self.waiting:
        if left <= 0:
            break
        if job in chunks:
            more = min(job.remaining - chunks[job], left)
            chunks[job] += more
            left -= more
        elif not blocked and seqs > 0 and not job.scheduled:
            if not self._allocate(job):
                blocked = True
                continue
            n = min(job.remaining, left)
            chunks[job] = n
            left -= n
            seqs -= 1
    return [(job, n) for job, n in chunks.items() if n > 0]


def _overload(n: int, gap: float, seed: int) -> list[SimRequest]:
    """Long and short prompts with shared prefixes, arriving faster than they are served."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(1 / gap)
        prompt = rng.choice((rng.randint(20, 200), rng.randint(600, 2500)))
        chain = synthesize_chain(f"g{i % 4}", 320, prompt, 16, i)
        out.append(SimRequest(f"r{i}", t, prompt, rng.randint(2, 60), chain))
    return out


def _dump(result) -> str:
    return json.dumps([r.to_json() for r in result.records])


@pytest.mark.parametrize(
    "config",
    [
        colocated(2, num_kv_blocks=160, long_prefill_token_threshold=256, max_num_seqs=16),
        disagg(2, 1, num_kv_blocks=200, long_prefill_token_threshold=300),
        colocated(1, num_kv_blocks=400, long_prefill_token_threshold=0),
    ],
    ids=["colocated-tight-blocks", "disagg", "fifo"],
)
def test_the_cut_short_queue_walk_schedules_what_the_full_walk_does(
    config, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = _overload(160, 0.05, seed=7)
    fast = simulate(config, profile(), requests, seed=1)
    monkeypatch.setattr(EngineReplica, "_schedule_prefill", _full_walk)
    full = simulate(config, profile(), requests, seed=1)
    assert _dump(fast) == _dump(full)
    assert fast.events == full.events
    assert any(not r.ok or r.ttft_s > 1.0 for r in full.records)  # it was overloaded


@pytest.mark.parametrize("n", [1, 9, 10, 11, 99, 100, 101, 61066])
@pytest.mark.parametrize("attainment", [0.5, 0.9, 0.95, 0.99, 1.0])
def test_miss_limit_is_the_last_count_that_can_still_meet(n: int, attainment: float) -> None:
    k = miss_limit(n, attainment)
    assert (n - k) / n >= attainment
    assert k == n or (n - k - 1) / n < attainment


def test_stopping_early_stops_only_runs_that_miss_and_changes_nothing_else() -> None:
    slo = RecordSlo(ttft_ms=500, tpot_ms=100)
    requests = _overload(300, 0.02, seed=3)
    limit = miss_limit(len(requests), 0.9)
    stop = SimOptions(miss_slo=slo, miss_limit=limit)
    whole = simulate(colocated(1), profile(), requests)
    cut = simulate(colocated(1), profile(), requests, options=stop)
    missed = sum(not slo.met_by(r) for r in whole.records)
    assert missed > limit and cut.stopped_s is not None and whole.stopped_s is None
    assert cut.events < whole.events / 2
    assert sum(slo.met_by(r) for r in cut.records) / len(requests) < 0.9
    assert cut.run_entry("x", slo)["simulator"]["stopped_s"] == cut.stopped_s
    light = _overload(40, 1.0, seed=3)  # meets it: never stopped, the very same run
    easy = simulate(colocated(2), profile(), light, options=stop)
    assert easy.stopped_s is None
    assert _dump(easy) == _dump(simulate(colocated(2), profile(), light))


def test_the_plan_is_the_same_with_runs_stopped_early() -> None:
    traffic = Traffic.from_mapping(
        {
            "duration_s": 30,
            "rate": 12.0,
            "input_tokens": {"dist": "uniform", "low": 64, "high": 700},
            "output_tokens": {"dist": "uniform", "low": 8, "high": 40},
            "prefix": {"groups": 2, "shared_tokens": 48, "fraction": 0.5},
            "seed": 5,
        }
    )
    slo = Slo(ttft_s=0.6, tpot_s=0.06)
    options = PlanOptions(max_gpus=8, refine=1, autoscale=False, multipliers=(0.5, 1.0))
    plans, evaluators = [], []
    for stop in (False, True):
        evaluate = SimEvaluator(traffic, profile(), slo, DEFAULT_CONFIG, stop_early=stop)
        plans.append(plan(evaluate, slo, options, Guess(1, 1, 1), progress=lambda _: None))
        evaluators.append(evaluate)
    whole, cut = plans
    assert [o.candidate for o in cut.ranked] == [o.candidate for o in whole.ranked]
    assert [replace(o, wall_s=0.0) for o in cut.ranked] == [
        replace(o, wall_s=0.0) for o in whole.ranked
    ]
    assert cut.curves == whole.curves
    stopped = [o for o in cut.outcomes if o.stopped_s is not None]
    assert stopped and all(not o.meets(slo) for o in stopped)
    assert all(o.stopped_s is None for o in whole.outcomes)
    assert cut.events < whole.events
    for candidate in (Candidate(DISAGG, 1, 1), Candidate(COLOCATED, 1)):
        a, b = (e(candidate) for e in evaluators)
        assert a.meets(slo) == b.meets(slo)


def test_a_big_pools_tie_order_is_the_same_in_every_process() -> None:
    """router.candidates.load_order's ties (fleets over NARROW_ABOVE workers) must not
    depend on str hashing, which changes per process: a simulated fleet would not repeat."""
    code = (
        "from router.candidates import load_order\n"
        "from common.worker_info import WorkerInfo, WorkerRole\n"
        "from router.snapshot import WorkerView\n"
        "info = [WorkerInfo(f'w{i:04d}', WorkerRole.PREFILL, 'p', 'm', 'a', None, None, 0.0)"
        " for i in range(100)]\n"
        "ws = [WorkerView(i, None) for i in info]\n"
        "print([w.worker_id for w in load_order(ws, (), (), 7).prefill][:20])\n"
    )
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        outputs.add(done.stdout)
    assert len(outputs) == 1
