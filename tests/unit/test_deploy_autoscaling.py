"""The pool autoscaling policies: pure functions over fake (and real) Serve contexts."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram

from common.worker_info import WorkerRole
from deploy.autoscaling import decode_policy, prefill_policy
from deploy.latency import RecentQuantile
from deploy.local_ray import pin_to_loopback
from deploy.scaling import (
    ITL_P90_MS,
    KV_BLOCK_USE,
    QUEUE_TIME_P90_MS,
    QUEUED_PREFILL_TOKENS,
    TTFT_P90_MS,
    DecodeTargets,
    PrefillTargets,
    Signal,
    decide,
    parse_targets,
)
from deploy.worker_host import WorkerHost
from worker.config import WorkerConfig
from worker.snapshot import WorkerSnapshot


def fake_ctx(
    metrics: dict[str, list[float]],
    *,
    current: int = 1,
    target: int | None = None,
    lo: int = 1,
    hi: int = 4,
    kwargs: dict[str, Any] | None = None,
) -> SimpleNamespace:
    """The attributes of ray.serve.config.AutoscalingContext the policies read."""
    aggregated = {name: {f"r{i}": v for i, v in enumerate(vs)} for name, vs in metrics.items()}
    return SimpleNamespace(
        aggregated_metrics=aggregated,
        current_num_replicas=current,
        target_num_replicas=current if target is None else target,
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
        policy_state={},
        config=SimpleNamespace(policy=SimpleNamespace(policy_kwargs=kwargs or {})),
    )


PREFILL = {"ttft_p90_ms": 1000.0, "queued_tokens_per_replica": 1000.0, "queue_time_p90_ms": 500.0}
DECODE = {"itl_p90_ms": 100.0, "kv_block_use": 0.5, "queue_time_p90_ms": 500.0}


# ---- the arithmetic ------------------------------------------------------------------------


def test_decide_takes_the_dominant_signal() -> None:
    signals = [Signal("a", 1.5, 1.0), Signal("b", 2.6, 1.0)]
    decision = decide(2, 2, signals, 1, 10)
    assert decision.replicas == 6  # ceil(2 * 2.6)
    assert decision.reason.startswith("b=2.6")


def test_decide_clamps_and_says_so() -> None:
    decision = decide(1, 1, [Signal("a", 9.0, 1.0)], 1, 2)
    assert decision.replicas == 2
    assert "wants 9" in decision.reason


def test_signals_without_samples_do_not_vote() -> None:
    assert decide(2, 2, [Signal("a", None, 1.0), Signal("b", 0.2, 1.0)], 1, 4).replicas == 1


def test_no_samples_at_all_holds_the_target() -> None:
    decision = decide(1, 3, [Signal("a", None, 1.0)], 1, 4)
    assert decision.replicas == 3
    assert "hold" in decision.reason


def test_exact_ratios_do_not_round_up_by_float_noise() -> None:
    assert decide(2, 2, [Signal("a", 0.1 + 0.2, 0.6)], 1, 4).replicas == 1


def test_targets_are_validated() -> None:
    assert parse_targets(PrefillTargets, None) == PrefillTargets()
    with pytest.raises(ValueError, match="ttft_p90_m"):
        parse_targets(PrefillTargets, {"ttft_p90_m": 5})  # typo: unknown key
    with pytest.raises(ValueError, match="kv_block_use"):
        parse_targets(DecodeTargets, {"kv_block_use": 1.5})


# ---- prefill -------------------------------------------------------------------------------


def test_prefill_scales_up_on_ttft() -> None:
    ctx = fake_ctx({TTFT_P90_MS: [2500.0], QUEUED_PREFILL_TOKENS: [0.0]}, kwargs=PREFILL)
    replicas, state = prefill_policy(ctx)
    assert replicas == 3
    assert state["pdserve"]["reason"].startswith(TTFT_P90_MS)


def test_prefill_scales_up_on_queued_tokens() -> None:
    ctx = fake_ctx({TTFT_P90_MS: [100.0], QUEUED_PREFILL_TOKENS: [1800.0]}, kwargs=PREFILL)
    assert prefill_policy(ctx)[0] == 2


def test_prefill_averages_over_replicas() -> None:
    ctx = fake_ctx(
        {TTFT_P90_MS: [1500.0, 300.0], QUEUED_PREFILL_TOKENS: [0.0, 0.0]},
        current=2,
        kwargs=PREFILL,
    )
    assert prefill_policy(ctx)[0] == 2  # mean 900 ms: ceil(2 * 0.9)


def test_idle_prefill_pool_shrinks_to_min() -> None:
    ctx = fake_ctx({QUEUED_PREFILL_TOKENS: [0.0, 0.0, 0.0]}, current=3, kwargs=PREFILL)
    assert prefill_policy(ctx)[0] == 1


def test_prefill_holds_before_any_metrics() -> None:
    assert prefill_policy(fake_ctx({}, current=2, target=2, kwargs=PREFILL))[0] == 2


def test_prefill_respects_bounds() -> None:
    ctx = fake_ctx({TTFT_P90_MS: [50_000.0]}, hi=2, kwargs=PREFILL)
    assert prefill_policy(ctx)[0] == 2


def test_prefill_uses_default_targets_without_kwargs() -> None:
    ctx = fake_ctx({TTFT_P90_MS: [PrefillTargets().ttft_p90_ms * 1.5]})
    assert prefill_policy(ctx)[0] == 2


def test_bad_kwargs_fail_loudly() -> None:
    with pytest.raises(ValueError, match="unknown"):
        prefill_policy(fake_ctx({TTFT_P90_MS: [1.0]}, kwargs={"unknown": 1}))


def test_prefill_scales_up_on_queue_time_while_ttft_of_completed_requests_looks_fine() -> None:
    # The blind spot: the few requests that got through were fast, the rest sit queued.
    ctx = fake_ctx(
        {TTFT_P90_MS: [400.0], QUEUED_PREFILL_TOKENS: [100.0], QUEUE_TIME_P90_MS: [1600.0]},
        kwargs=PREFILL,
    )
    replicas, state = prefill_policy(ctx)
    assert replicas == 4  # ceil(1 * 1600 / 500)
    assert state["pdserve"]["reason"].startswith(QUEUE_TIME_P90_MS)


def test_queue_time_of_idle_replicas_does_not_vote() -> None:
    # Replicas without queued requests report no queue time; the one that does counts.
    ctx = fake_ctx(
        {QUEUED_PREFILL_TOKENS: [0.0, 0.0], QUEUE_TIME_P90_MS: [750.0]}, current=2, kwargs=PREFILL
    )
    assert prefill_policy(ctx)[0] == 3  # ceil(2 * 750 / 500)
    quiet = fake_ctx({QUEUED_PREFILL_TOKENS: [0.0, 0.0]}, current=2, kwargs=PREFILL)
    assert prefill_policy(quiet)[0] == 1  # no queue time at all: the gauges let it shrink


def test_queue_time_target_has_a_default() -> None:
    assert PrefillTargets().queue_time_p90_ms > 0 and DecodeTargets().queue_time_p90_ms > 0
    ctx = fake_ctx({QUEUE_TIME_P90_MS: [PrefillTargets().queue_time_p90_ms * 2]})
    assert prefill_policy(ctx)[0] == 2
    with pytest.raises(ValueError, match="queue_time_p90_ms"):
        parse_targets(PrefillTargets, {"queue_time_p90_ms": 0})


# ---- decode --------------------------------------------------------------------------------


def test_decode_scales_up_on_itl() -> None:
    ctx = fake_ctx({ITL_P90_MS: [250.0], KV_BLOCK_USE: [0.1]}, kwargs=DECODE)
    assert decode_policy(ctx)[0] == 3


def test_decode_scales_up_on_kv_use() -> None:
    ctx = fake_ctx({ITL_P90_MS: [20.0], KV_BLOCK_USE: [0.9]}, kwargs=DECODE)
    replicas, state = decode_policy(ctx)
    assert replicas == 2
    assert state["pdserve"]["reason"].startswith(KV_BLOCK_USE)


def test_decode_scales_up_on_queue_time_while_itl_looks_fine() -> None:
    ctx = fake_ctx(
        {ITL_P90_MS: [40.0], KV_BLOCK_USE: [0.3], QUEUE_TIME_P90_MS: [1200.0]}, kwargs=DECODE
    )
    replicas, state = decode_policy(ctx)
    assert replicas == 3  # ceil(1200 / 500)
    assert state["pdserve"]["reason"].startswith(QUEUE_TIME_P90_MS)


def test_decode_scales_down_when_light() -> None:
    ctx = fake_ctx({ITL_P90_MS: [30.0, 30.0], KV_BLOCK_USE: [0.1, 0.2]}, current=2, kwargs=DECODE)
    assert decode_policy(ctx)[0] == 1


# ---- against Serve's own types and wrapper ---------------------------------------------------


def _serve_ctx(metrics: dict[str, float], kwargs: dict[str, Any], **config: Any) -> Any:
    pin_to_loopback()  # a later in-process Ray node in this session must stay on loopback
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    dep = DeploymentID(name="PrefillWorker", app_name="pdserve")
    replica = ReplicaID(unique_id="abc", deployment_id=dep)
    cfg = AutoscalingConfig(
        min_replicas=1,
        max_replicas=2,
        policy={"policy_function": "deploy.autoscaling:prefill_policy", "policy_kwargs": kwargs},
        **config,
    )
    return AutoscalingContext(
        deployment_id=dep,
        deployment_name=dep.name,
        app_name=dep.app_name,
        current_num_replicas=1,
        target_num_replicas=1,
        running_replicas=[replica],
        total_num_requests=0.0,
        total_queued_requests=0.0,
        aggregated_metrics=lambda: {k: {replica: v} for k, v in metrics.items()},
        raw_metrics=None,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=2,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=0.0,
        config=cfg,
    )


def test_real_context_and_policy_kwargs_reach_the_policy() -> None:
    ctx = _serve_ctx({TTFT_P90_MS: 3000.0, QUEUED_PREFILL_TOKENS: 0.0}, PREFILL)
    assert prefill_policy(ctx)[0] == 2
    relaxed = _serve_ctx({TTFT_P90_MS: 3000.0}, {"ttft_p90_ms": 10_000.0})
    assert prefill_policy(relaxed)[0] == 1


def test_serve_wrapper_applies_the_upscale_delay() -> None:
    pin_to_loopback()
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    wrapped = _apply_autoscaling_config(prefill_policy)
    metrics = {TTFT_P90_MS: 3000.0, QUEUED_PREFILL_TOKENS: 0.0}
    ctx = _serve_ctx(metrics, PREFILL, upscale_delay_s=3600.0)
    replicas, state = wrapped(ctx)
    assert replicas == 1  # wants 2, held by the delay
    assert state["pdserve"]["replicas"] == 2  # our state survives Serve's merge
    now = _serve_ctx(metrics, PREFILL, upscale_delay_s=0.0)
    assert wrapped(now)[0] == 2


# ---- what a worker replica reports ---------------------------------------------------------


def _host_with(snapshot: WorkerSnapshot) -> WorkerHost:
    """A WorkerHost as it is once serving, with a runtime that only takes snapshots."""
    config = WorkerConfig(role=WorkerRole.PREFILL, worker_id="prefill-x", redis_url="redis://x")
    host = WorkerHost(config)
    host._runtime = SimpleNamespace(snapshot=lambda: snapshot)  # type: ignore[assignment]
    host._ttft = RecentQuantile(Histogram("t_seconds", "", registry=CollectorRegistry()))
    host.info = SimpleNamespace()  # type: ignore[assignment]
    return host


def test_worker_reports_queue_time_only_when_it_has_samples() -> None:
    base = WorkerSnapshot(0, 0, 10, 0, 0, 10, 0, queued_prefill_tokens=5)
    idle = _host_with(base).autoscaling_stats()
    assert QUEUE_TIME_P90_MS not in idle and TTFT_P90_MS not in idle
    assert idle[QUEUED_PREFILL_TOKENS] == 5.0
    queued = _host_with(dataclasses.replace(base, queue_time_ms_recent=850.0))
    assert queued.autoscaling_stats()[QUEUE_TIME_P90_MS] == 850.0
