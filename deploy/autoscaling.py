"""Serve custom autoscaling policies of the prefill and decode pools.

Plugged in from ``deploy/serve.yaml``::

    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      upscale_delay_s: 5          # Serve holds a decision this long before acting
      downscale_delay_s: 60
      policy:
        policy_function: deploy.autoscaling:prefill_policy
        policy_kwargs: {ttft_p90_ms: 2000, queued_tokens_per_replica: 8192,
                        queue_time_p90_ms: 1000}

Serve calls a policy on its controller every control-loop tick with an
``AutoscalingContext``; it returns ``(replicas, policy_state)``. Serve then applies the
``upscaling_factor`` / ``downscaling_factor``, the replica bounds and the delays. These
functions are pure: everything they read is in the context — the per-replica metrics the
worker replicas record with ``record_autoscaling_stats()`` (already averaged by Serve over
``look_back_period_s``), the current replica count and bounds, and the targets, which
are ``policy_kwargs`` (Serve hands ``policy_kwargs`` only to class policies, so a
function reads them from ``ctx.config.policy``).

Serve pickles this module by value into its controller; the types it uses live in
:mod:`deploy.scaling`, which the controller imports normally.
"""

from __future__ import annotations

from typing import Any

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
    mean,
    parse_targets,
)


def prefill_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Scale the prefill pool on TTFT p90, prompt tokens queued for prefill and queue time."""
    targets = parse_targets(PrefillTargets, _policy_kwargs(ctx))
    per_replica = _per_replica(ctx)
    signals = [
        Signal(TTFT_P90_MS, mean(per_replica.get(TTFT_P90_MS, [])), targets.ttft_p90_ms),
        Signal(
            QUEUED_PREFILL_TOKENS,
            mean(per_replica.get(QUEUED_PREFILL_TOKENS, [])),
            targets.queued_tokens_per_replica,
        ),
        _queue_time(per_replica, targets.queue_time_p90_ms),
    ]
    return _result(ctx, signals)


def decode_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Scale the decode pool on ITL p90, the fraction of KV blocks in use and queue time."""
    targets = parse_targets(DecodeTargets, _policy_kwargs(ctx))
    per_replica = _per_replica(ctx)
    signals = [
        Signal(ITL_P90_MS, mean(per_replica.get(ITL_P90_MS, [])), targets.itl_p90_ms),
        Signal(KV_BLOCK_USE, mean(per_replica.get(KV_BLOCK_USE, [])), targets.kv_block_use),
        _queue_time(per_replica, targets.queue_time_p90_ms),
    ]
    return _result(ctx, signals)


def _queue_time(per_replica: dict[str, list[float]], target_ms: float) -> Signal:
    """Admission-queue wait p90, averaged over the replicas that have samples.

    It votes even when TTFT / ITL of completed requests look fine: those are measured
    when work finishes, so requests stuck in a queue do not show in them yet (or ever,
    if they time out there). A replica with no queued request in the window reports
    nothing and does not pull the mean down to 0."""
    return Signal(QUEUE_TIME_P90_MS, mean(per_replica.get(QUEUE_TIME_P90_MS, [])), target_ms)


def _result(ctx: Any, signals: list[Signal]) -> tuple[int, dict[str, Any]]:
    decision = decide(
        ctx.current_num_replicas,
        ctx.target_num_replicas,
        signals,
        ctx.capacity_adjusted_min_replicas,
        ctx.capacity_adjusted_max_replicas,
    )
    return decision.replicas, {"pdserve": decision.as_state()}


def _per_replica(ctx: Any) -> dict[str, list[float]]:
    """metric name → the values of the running replicas that reported it."""
    metrics = ctx.aggregated_metrics or {}
    return {
        name: [float(v) for v in by_replica.values()]
        for name, by_replica in metrics.items()
        if by_replica
    }


def _policy_kwargs(ctx: Any) -> dict[str, Any]:
    config = getattr(ctx, "config", None)
    policy = getattr(config, "policy", None)
    return dict(getattr(policy, "policy_kwargs", None) or {})
