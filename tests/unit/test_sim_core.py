"""The simulator's timing against the cost model: exact sums, queueing, runs, determinism."""

from __future__ import annotations

import json

import pytest

from capacity.cost_model import CostModel
from capacity.sim import SimOptions, SimRequest, simulate
from capacity.trace import synthesize_chain
from tests.unit.sim_helpers import colocated, disagg, profile


def _requests(n: int, rate_gap: float = 0.3, seed: int = 0) -> list[SimRequest]:
    import random

    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(1 / rate_gap)
        prompt = rng.randint(40, 900)
        chain = synthesize_chain(f"g{i % 3}", 256, prompt, 16, i)
        out.append(SimRequest(f"r{i}", t, prompt, rng.randint(2, 40), chain))
    return out


def test_same_seed_same_result_and_every_request_completes() -> None:
    requests = _requests(60)
    first = simulate(disagg(2, 2), profile(), requests, seed=3)
    second = simulate(disagg(2, 2), profile(), requests, seed=3)
    dump = [json.dumps([r.to_json() for r in x.records]) for x in (first, second)]
    assert dump[0] == dump[1]
    assert first.events == second.events
    outputs = {r.request_id: r.output_tokens for r in requests}
    assert all(r.ok and r.output_tokens == outputs[r.session_id] for r in first.records)


def test_single_request_times_are_the_cost_models_sums() -> None:
    prof = profile()
    cost = CostModel(prof)
    prompt, output = 300, 6
    result = simulate(disagg(), prof, [SimRequest("a", 1.0, prompt, output, ())])
    (record,) = result.records
    step = cost.prefill_s(prompt, 0)
    transfer = max(cost.transfer_s(cost.kv_bytes(prompt)) - step, prof.transfer.latency_s)
    first = 1.0 + prof.router_decision_s + 2 * prof.overheads["rpc_s"] + step + transfer
    assert record.chunk_times[0] == pytest.approx(first, abs=1e-12)
    expected, t = [first], first
    for i in range(output - 1):
        t += cost.decode_step_s(1, prompt + 1 + i)
        expected.append(t)
    assert record.chunk_times == pytest.approx(expected, abs=1e-12)
    assert record.ttft_s == pytest.approx(first - 1.0)
    assert record.end_s == pytest.approx(expected[-1])


def test_two_requests_on_one_replica_share_the_token_budget() -> None:
    prof = profile()
    cost = CostModel(prof)
    # a (1500 tokens) starts alone; b (600) arrives during a's first chunk and waits
    requests = [SimRequest("a", 0.0, 1500, 2, ()), SimRequest("b", 0.01, 600, 2, ())]
    result = simulate(disagg(max_num_batched_tokens=1024), prof, requests)
    a, b = sorted(result.records, key=lambda r: r.session_id)
    start = prof.router_decision_s + 2 * prof.overheads["rpc_s"]
    step1 = cost.prefill_s(1024, 0)  # a: 1024
    step2 = cost.prefill_s(476 + 548, 1024)  # a: last 476 (after 1024), b: first 548
    step3 = cost.prefill_s(52, 548)  # b: last 52
    latency = prof.transfer.latency_s

    def land(step: float, prompt: int) -> float:
        return max(cost.transfer_s(cost.kv_bytes(prompt)) - step, latency)

    assert a.chunk_times[0] == pytest.approx(start + step1 + step2 + land(step2, 1500))
    assert b.chunk_times[0] == pytest.approx(start + step1 + step2 + step3 + land(step3, 600))
    assert b.ttft_s > a.ttft_s - 0.01  # b waited for a's chunks


@pytest.mark.parametrize("config", [disagg(1, 2), colocated(2)], ids=["disagg", "colocated"])
def test_decode_runs_give_the_same_token_times_as_per_step_stepping(config) -> None:
    requests = _requests(40, rate_gap=0.05)
    runs = simulate(config, profile(), requests, options=SimOptions(log_steps=True))
    steps = simulate(config, profile(), requests, options=SimOptions(log_steps=True, per_step=True))
    assert steps.events > runs.events  # one event per step vs one per run
    for a, b in zip(runs.records, steps.records, strict=True):
        assert a.session_id == b.session_id
        assert a.chunk_times == pytest.approx(b.chunk_times, abs=1e-9)


def test_summary_histogram_matches_exact_token_times() -> None:
    from loadgen.summary import Slo

    requests = _requests(80, rate_gap=0.1)
    exact = simulate(disagg(), profile(), requests, options=SimOptions(log_steps=True))
    compact = simulate(disagg(), profile(), requests, options=SimOptions(log_steps=False))
    assert compact.token_times == "summary" and exact.token_times == "full"
    a, b = exact.summary(Slo()), compact.summary(Slo())
    assert a["ttft_ms"] == b["ttft_ms"] and a["tpot_ms"] == b["tpot_ms"]
    assert a["itl_ms"]["n"] == b["itl_ms"]["n"]
    for q in ("p50", "p90", "p99"):
        assert b["itl_ms"][q] == pytest.approx(a["itl_ms"][q], rel=0.03)


def test_router_admission_refuses_past_max_queued() -> None:
    from router.config import PoolConfig

    config = disagg()
    config = type(config)(
        pool=PoolConfig("default", max_in_flight=1, max_queued=1),
        prefill=config.prefill,
        decode=config.decode,
    )
    requests = [SimRequest(f"r{i}", 0.0, 100, 20, ()) for i in range(4)]
    result = simulate(config, profile(), requests)
    assert sum(r.refused for r in result.records) == 2
    assert sum(r.ok for r in result.records) == 2


@pytest.mark.parametrize("threshold", [512, 0])
def test_a_short_prompt_runs_beside_a_long_prefill(threshold: int) -> None:
    """The real PrefillPolicy: capped long chunks let a short prompt in at once; 0 = FIFO."""
    from dataclasses import replace

    config = disagg(max_num_batched_tokens=1024)
    engine = replace(config.prefill.engine, long_prefill_token_threshold=threshold)
    config = replace(config, prefill=replace(config.prefill, engine=engine))
    requests = [SimRequest("long", 0.0, 4000, 2, ()), SimRequest("short", 0.05, 64, 2, ())]
    result = simulate(config, profile(), requests)
    ttft = {r.session_id: r.ttft_s for r in result.records}
    if threshold:
        assert ttft["short"] < ttft["long"] / 2  # the next step, beside a 512-token chunk
    else:
        assert ttft["short"] > ttft["long"] - 0.1  # behind every chunk of the long one
