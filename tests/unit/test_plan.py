"""capacity/plan.py's search policy on a fake evaluator (no simulator), and its YAML."""

from __future__ import annotations

import math

import pytest

from capacity.plan import PlanError, PlanOptions, cost_key, plan
from capacity.plan_types import COLOCATED, DISAGG, Candidate, Guess, Outcome, Slo
from capacity.serve_yaml import GPU_CONFIG, candidate_config, write_config
from deploy.serve_config import ServeConfig

SLO = Slo(ttft_s=0.5, tpot_s=0.05)


def fake(rate: float = 10.0, calls: list | None = None):
    """A cluster where prefill needs 2 replicas per 10 req/s and decode 3, and one spare
    prefill replica lets two decode replicas go (a joint SLO's trade-off). Colocated
    workers each do 0.18 of the load unit. Autoscaling saves GPU-hours. Attainment is
    0.95 when every pool is big enough, else 0.9 x the worst pool's share of its need."""

    def evaluate(candidate: Candidate, multiplier: float) -> Outcome:
        if calls is not None:
            calls.append((candidate, multiplier))
        load = rate * multiplier / 10
        if candidate.layout == DISAGG:
            need_p, need_d = math.ceil(2 * load), math.ceil(3 * load)
            slack = candidate.prefill - need_p
            need_d -= 2 if slack >= 1 else 0
            share = min(candidate.prefill / need_p, candidate.decode / max(need_d, 1))
        else:
            share = candidate.prefill * 0.18 / load
        attainment = 0.95 if share >= 1 else 0.9 * share
        hours = candidate.gpus * (0.8 if candidate.prefill_scaling else 1.0)
        return Outcome(candidate, attainment, attainment * rate, hours, 0.1, 0.01, 100)

    return evaluate


def test_picks_the_cheapest_feasible_split_with_few_simulations() -> None:
    calls: list = []
    result = plan(fake(100.0, calls), SLO, PlanOptions(max_gpus=100), progress=lambda _: None)
    # prefill alone needs 20, decode 30; 21P lets decode drop to 28 (49 in all);
    # colocated needs ceil(10 / 0.18) = 56 workers.
    best = result.chosen.candidate
    assert (best.layout, best.prefill, best.decode) == (DISAGG, 21, 28)
    labels = [o.candidate.label() for o in result.ranked]
    assert "56 colocated" in labels and labels.index("56 colocated") > 0
    assert result.evaluated == len(set(calls)) < 60
    assert all(o.meets(SLO) and o.candidate.gpus <= 100 for o in result.ranked)
    assert list(result.ranked) == sorted(result.ranked, key=cost_key)


def test_a_good_guess_costs_fewer_simulations() -> None:
    cold: list = []
    warm: list = []
    options = PlanOptions(max_gpus=400, layouts=(DISAGG,))
    plan(fake(100.0, cold), SLO, options, progress=lambda _: None)
    hot = plan(fake(100.0, warm), SLO, options, Guess(20, 30, 56), progress=lambda _: None)
    assert hot.chosen.candidate.gpus == 49
    assert len(warm) < len(cold)


def test_curves_cover_the_multipliers_and_fall_with_load() -> None:
    result = plan(fake(), SLO, PlanOptions(max_gpus=20, curves=2), progress=lambda _: None)
    assert len(result.curves) == 2
    points = result.curves[result.chosen.candidate.label()]
    assert [p.multiplier for p in points] == list(PlanOptions().multipliers)
    attainment = [p.attainment for p in points]
    assert attainment == sorted(attainment, reverse=True) and attainment[-1] < 0.9


def test_autoscaled_variant_wins_when_the_rate_varies() -> None:
    options = PlanOptions(max_gpus=20, trough=0.3)
    result = plan(fake(), SLO, options, progress=lambda _: None)
    chosen = result.chosen.candidate
    assert chosen.prefill_scaling is not None and chosen.decode_scaling is not None
    assert chosen.prefill_scaling.min_replicas == max(1, math.floor(chosen.prefill * 0.3))
    assert dict(chosen.decode_scaling.targets)["itl_p90_ms"] in (25.0, 40.0)
    path_config = candidate_config(chosen, GPU_CONFIG)
    assert path_config.deployment("DecodeWorker")["autoscaling_config"]["max_replicas"] == (
        chosen.decode
    )


def test_infeasible_says_what_came_closest() -> None:
    with pytest.raises(PlanError, match=r"no configuration within 4 GPUs .* closest: .*%"):
        plan(fake(100.0), SLO, PlanOptions(max_gpus=4), progress=lambda _: None)


def test_progress_lines_name_the_best_so_far() -> None:
    lines: list[str] = []
    plan(fake(), SLO, PlanOptions(max_gpus=10, layouts=(COLOCATED,)), progress=lines.append)
    assert lines and all(line.startswith("[plan] ") for line in lines)
    assert "best 6 colocated" in lines[-1]


def test_the_chosen_yaml_passes_the_checks(tmp_path) -> None:
    result = plan(fake(), SLO, PlanOptions(max_gpus=20), progress=lambda _: None)
    path = write_config(candidate_config(result.chosen.candidate), tmp_path / "serve.yaml")
    loaded = ServeConfig.load(path)
    assert loaded.deployment("PrefillWorker")["num_replicas"] == result.chosen.candidate.prefill


def parts(rate: float, calls: list):
    """Separable pools that report the TTFT / TPOT parts: prefill needs 2 per 10 req/s,
    decode 3; each part is 0.97 when its pool is big enough (joint 0.97 * 0.97)."""

    def evaluate(candidate: Candidate, multiplier: float) -> Outcome:
        calls.append(candidate)
        load = rate * multiplier / 10
        ttft = 0.97 if candidate.prefill >= math.ceil(2 * load) else 0.5
        tpot = 0.97 if candidate.decode >= math.ceil(3 * load) else 0.5
        joint = ttft * tpot
        return Outcome(candidate, joint, joint * rate, candidate.gpus, 0.1, 0.01, 100, ttft, tpot)

    return evaluate


def test_a_sub_fleet_searches_on_its_lattice() -> None:
    calls: list = []
    options = PlanOptions(max_gpus=1000, layouts=(DISAGG,), step=50, refine=1, curves=0)
    result = plan(parts(1000.0, calls), SLO, options, Guess(150, 250, 1), progress=lambda _: None)
    assert all(c.prefill % 50 == 0 and c.decode % 50 == 0 for c in calls)
    assert (result.chosen.candidate.prefill, result.chosen.candidate.decode) == (200, 300)


def test_the_router_gate_grows_with_the_fleet() -> None:
    config = candidate_config(Candidate(DISAGG, 500, 500), GPU_CONFIG)
    pool = config.data["applications"][0]["args"]["router"]["pools"][0]
    assert pool["max_in_flight"] == 500 * 256 and pool["max_queued"] >= 500 * 256
    small = candidate_config(Candidate(DISAGG, 1, 1), GPU_CONFIG)
    assert small.data["applications"][0]["args"]["router"]["pools"][0]["max_in_flight"] == 256
