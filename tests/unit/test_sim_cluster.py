"""The simulator runs the real router and autoscaling code: routing, conditional prefill,
autoscaling with Serve's delays, and the Serve YAML it reads."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from capacity.sim import SimRequest, sim_config_from_serve, simulate
from capacity.trace import synthesize_chain
from common.worker_info import WorkerRole
from tests.unit.sim_helpers import autoscaled, disagg, profile

SERVE_YAML = Path(__file__).resolve().parents[2] / "deploy" / "serve.yaml"


def _group_requests(groups: int, per_group: int, gap: float) -> list[SimRequest]:
    out = []
    for i in range(groups * per_group):
        g = i % groups
        chain = synthesize_chain(f"sys{g}", 512, 560, 16, i)
        out.append(SimRequest(f"r{i:03d}", i * gap, 560, 4, chain, group=f"g{g}"))
    return out


def _prefill_worker(route: str) -> str:
    return route.split("->")[0]


def test_prefix_aware_sends_a_shared_prefix_to_the_same_prefill_replica() -> None:
    requests = _group_requests(2, 6, 0.5)
    result = simulate(disagg(2, 1, policy="prefix_aware"), profile(), requests)
    by_group: dict[str, set[str]] = {}
    for record in result.records:
        by_group.setdefault(record.group, set()).add(_prefill_worker(record.route))
    assert all(len(workers) == 1 for workers in by_group.values()), by_group
    assert by_group["g0"] != by_group["g1"]  # the two groups spread over both workers
    later = [r for r in result.records if r.session_id not in ("r000", "r001")]
    assert all(r.cached_tokens == 512 for r in later)


def test_round_robin_alternates_and_loses_prefix_hits() -> None:
    requests = _group_requests(3, 6, 0.5)  # 3 groups over 2 workers: turns split groups
    aware = simulate(disagg(2, 1, policy="prefix_aware"), profile(), requests)
    robin = simulate(disagg(2, 1, policy="round_robin"), profile(), requests)
    workers = [_prefill_worker(r.route) for r in robin.records]
    assert workers[0] != workers[1] and workers[0] == workers[2]

    def hits(result: object) -> int:
        return sum(r.cached_tokens or 0 for r in result.records)  # type: ignore[attr-defined]

    assert hits(robin) < hits(aware)


def test_conditional_prefills_short_prompts_on_the_decode_replica() -> None:
    conditional = {"enabled": True, "local_max_uncached_tokens": 256}
    config = disagg(1, 1, conditional=conditional)
    requests = [
        SimRequest("short", 0.0, 100, 4, ()),
        SimRequest("long", 1.0, 900, 4, ()),
    ]
    result = simulate(config, profile(), requests)
    routes = {r.session_id: r.route for r in result.records}
    assert "->" not in routes["short"] and routes["short"].startswith("decode")
    assert routes["long"].startswith("prefill") and "->" in routes["long"]
    assert all(r.ok for r in result.records)


def test_autoscaling_scales_up_after_the_delay_and_back_down() -> None:
    config = disagg(1, 1)
    prefill = autoscaled(
        config.prefill,
        1,
        3,
        "deploy.autoscaling:prefill_policy",
        ttft_p90_ms=300,
        queued_tokens_per_replica=2048,
    )
    config = replace(config, prefill=prefill)
    heavy = [SimRequest(f"h{i}", i * 0.1, 800, 2, ()) for i in range(300)]  # 30 s overload
    light = [SimRequest(f"l{i}", 30 + i * 2.0, 100, 2, ()) for i in range(40)]  # 80 s quiet
    result = simulate(config, profile(), heavy + light)
    counts = [(t, n) for t, _, role, n in result.replica_timeline if role == "prefill"]
    peak = max(n for _, n in counts)
    assert peak >= 2
    first_up = next(t for t, n in counts if n >= 2)
    assert first_up >= 5.0 + 5.0  # the upscale delay + replica start-up
    assert counts[-1][1] == 1  # back to min_replicas when the load went away
    down = next(t for t, n in counts if t > first_up and n < peak)
    assert down > 30.0


def test_sim_config_from_the_shipped_serve_yaml() -> None:
    config = sim_config_from_serve(SERVE_YAML)
    assert config.disaggregated and config.colocated is None
    assert config.prefill is not None and config.decode is not None
    assert config.prefill.role is WorkerRole.PREFILL
    assert config.prefill.engine.max_num_batched_tokens == 1024
    assert config.decode.engine.max_num_seqs == 64
    auto = config.prefill.autoscale
    assert auto is not None and auto.policy_function == "deploy.autoscaling:prefill_policy"
    assert (auto.min_replicas, auto.max_replicas, auto.upscale_delay_s) == (1, 2, 5.0)
    assert auto.policy_kwargs["ttft_p90_ms"] == 2000
    assert config.pool.policy.value == "prefix_aware"


def test_a_prompt_no_cache_can_hold_is_refused_and_the_run_ends() -> None:
    config = disagg(1, 1, num_kv_blocks=64)  # 1024 tokens of KV per replica
    prefill = autoscaled(config.prefill, 1, 2, "deploy.autoscaling:prefill_policy")
    config = replace(config, prefill=prefill)
    requests = [SimRequest("huge", 0.0, 5000, 4, ()), SimRequest("ok", 0.5, 200, 4, ())]
    result = simulate(config, profile(), requests)
    records = {r.session_id: r for r in result.records}
    assert records["huge"].refused and records["ok"].ok


def test_measured_overheads_are_charged_where_the_cost_model_says() -> None:
    """A remote prefill pays the hand-off per prompt token before its first token and the
    join on its first decode step; a local (conditional) prefill pays the local pair, not
    the remote one; later decode steps pay neither."""
    conditional = {"enabled": True, "local_max_uncached_tokens": 256}
    requests = [SimRequest("long", 0.0, 600, 4, ()), SimRequest("short", 5.0, 100, 4, ())]
    extras = {
        "rpc_s": 0.0005,
        "prefill_step_overhead_s": 0.04,
        "local_prefill_step_overhead_s": 0.01,
        "handoff_token_overhead_s": 1e-4,
        "first_decode_step_overhead_s": 0.05,
    }

    def run(overheads: dict) -> dict:
        result = simulate(
            disagg(1, 1, conditional=conditional), profile(overheads=overheads), requests
        )
        return {r.session_id: r for r in result.records}

    base, charged = run({"rpc_s": 0.0005}), run(extras)
    assert "->" in base["long"].route and "->" not in base["short"].route
    assert charged["long"].ttft_s - base["long"].ttft_s == pytest.approx(0.04 + 600 * 1e-4)
    assert charged["short"].ttft_s - base["short"].ttft_s == pytest.approx(0.01)
    long_gaps = [c - b for c, b in zip(charged["long"].itls_s, base["long"].itls_s, strict=True)]
    assert long_gaps[0] == pytest.approx(0.05) and long_gaps[1:] == pytest.approx([0.0, 0.0])
    assert charged["short"].itls_s == pytest.approx(base["short"].itls_s)  # local: no join


def test_a_remote_request_landing_on_a_busy_decode_replica_waits_and_joins_late() -> None:
    """With the busy-decode overheads, a request whose KV lands while the decode replica is
    mid-run gets its first token that much later (yet joins the batch at the next boundary
    as before) and the step it joins at pays the join into the running batch; one landing
    on an idle replica pays neither."""
    requests = [SimRequest("first", 0.0, 600, 200, ()), SimRequest("second", 3.0, 600, 4, ())]

    def run(overheads: dict) -> dict:
        result = simulate(disagg(1, 1), profile(overheads={"rpc_s": 0.0005, **overheads}), requests)
        return {r.session_id: r for r in result.records}

    base = run({})
    busy = run({"busy_decode_handoff_s": 0.015, "join_running_batch_overhead_s": 0.02})
    assert busy["first"].ttft_s == pytest.approx(base["first"].ttft_s)  # landed on idle
    assert busy["first"].itls_s[:5] == pytest.approx(base["first"].itls_s[:5])
    assert busy["second"].ttft_s - base["second"].ttft_s == pytest.approx(0.015)
    # it joined at the same boundary: its second token is no later than the join costs
    second_token = busy["second"].ttft_s + busy["second"].itls_s[0]
    base_second = base["second"].ttft_s + base["second"].itls_s[0]
    assert second_token - base_second == pytest.approx(0.02, abs=1e-4)
    # a delay past the shortest decode step (0.02 s here) is capped there: tokens stay in order
    capped = run({"busy_decode_handoff_s": 0.5})
    assert capped["second"].ttft_s - base["second"].ttft_s == pytest.approx(0.02)
    assert all(gap > 0 for gap in capped["second"].itls_s)
    # the step that joins "second" into the running batch starts 0.02 late: "first" ends later
    assert busy["first"].end_s - base["first"].end_s == pytest.approx(0.02, abs=1e-4)
