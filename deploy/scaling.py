"""The arithmetic of pool autoscaling: targets from YAML, signals in, a replica count out.

Torch-free, Ray-free and deterministic, so every rule is unit-tested with plain numbers;
:mod:`deploy.autoscaling` adapts Serve's ``AutoscalingContext`` to it.

The rule is proportional, like Serve's own request-based policy, over several signals::

    ratio(signal) = observed / target          (per replica, averaged over the pool)
    desired       = ceil(replicas * max(ratio of every signal that has samples))
    desired       = clamp(desired, min_replicas, max_replicas)

The dominant signal is named in the decision (``reason``), so a scaling event can be
explained from the controller log alone. A signal with no samples (an idle pool has no
recent TTFT) does not vote; the gauges (queued tokens, KV use) always have samples, and an
idle pool's gauges read 0, which asks for ``min_replicas``: that is how it shrinks. When
no signal has samples at all (replicas that have not reported yet) the count is held at
Serve's current target. How fast the
count moves toward ``desired`` is Serve's business: ``upscale_delay_s`` /
``downscale_delay_s`` hold a decision until it has persisted that long, and
``upscaling_factor`` / ``downscaling_factor`` damp each step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Metric names the replicas report through ``record_autoscaling_stats`` (see
# :mod:`deploy.worker_host`) and the policies read from ``aggregated_metrics``.
TTFT_P90_MS = "ttft_p90_ms"  # prefill: p90 of RPC arrival → first token, recent window
QUEUED_PREFILL_TOKENS = "queued_prefill_tokens"  # prefill: prompt tokens not yet computed
ITL_P90_MS = "itl_p90_ms"  # decode: p90 of inter-token latency, recent window
KV_BLOCK_USE = "kv_block_use"  # decode: fraction of KV blocks referenced (0..1)
# both roles: p90 of a request's wait in the worker's admission queue (accepted → work
# started), recent window. TTFT / ITL are measured on *finished* work, so a pool whose
# requests sit in a queue looks healthy until they come out; queue time sees them waiting.
QUEUE_TIME_P90_MS = "queue_time_p90_ms"

_T = TypeVar("_T", bound=BaseModel)


class PrefillTargets(BaseModel):
    """``policy_kwargs`` of ``deploy.autoscaling:prefill_policy``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_p90_ms: float = Field(2000.0, gt=0, description="TTFT p90 each replica should meet")
    queued_tokens_per_replica: float = Field(
        8192.0, gt=0, description="prompt tokens waiting for prefill, per replica"
    )
    queue_time_p90_ms: float = Field(
        1000.0, gt=0, description="admission-queue wait p90 each replica should meet"
    )


class DecodeTargets(BaseModel):
    """``policy_kwargs`` of ``deploy.autoscaling:decode_policy``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    itl_p90_ms: float = Field(200.0, gt=0, description="inter-token latency p90 per replica")
    kv_block_use: float = Field(
        0.8, gt=0, le=1, description="fraction of each replica's KV blocks in use"
    )
    queue_time_p90_ms: float = Field(
        1000.0, gt=0, description="admission-queue wait p90 each replica should meet"
    )


def parse_targets(kind: type[_T], kwargs: Mapping[str, Any] | None) -> _T:
    """Validated targets; ValueError (not pydantic's) names the bad key."""
    try:
        return kind.model_validate(dict(kwargs or {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"{kind.__name__}: {problems}") from None


@dataclass(frozen=True, slots=True)
class Signal:
    """One load signal of a pool, already reduced to a per-replica value."""

    name: str
    value: float | None  # None: no replica has samples (an idle pool)
    target: float  # > 0

    @property
    def ratio(self) -> float | None:
        return None if self.value is None else self.value / self.target


@dataclass(frozen=True, slots=True)
class Decision:
    replicas: int
    reason: str  # the dominant signal and its ratio, or why the count was held

    def as_state(self) -> dict[str, Any]:
        """JSON-able, for the policy state Serve keeps between ticks."""
        return {"replicas": self.replicas, "reason": self.reason}


def decide(
    current: int,
    target: int,
    signals: Sequence[Signal],
    min_replicas: int,
    max_replicas: int,
) -> Decision:
    """The replica count the signals ask for, clamped to the bounds; see the module doc.

    ``current`` is the number of running replicas the signals were measured on,
    ``target`` the count Serve is currently moving toward (returned to hold).
    """
    voting = [(s, s.ratio) for s in signals if s.ratio is not None]
    if current <= 0 or not voting:
        return Decision(_clamp(target, min_replicas, max_replicas), "no metrics yet: hold")
    signal, ratio = max(voting, key=lambda pair: pair[1])
    wanted = math.ceil(round(current * ratio, 9))  # round: 2 * 0.5000000001 must stay 1
    replicas = _clamp(max(wanted, 0), min_replicas, max_replicas)
    reason = f"{signal.name}={signal.value:.4g} target={signal.target:.4g} ratio={ratio:.2f}"
    if replicas != wanted:
        reason += f" (wants {wanted}, bounded to [{min_replicas}, {max_replicas}])"
    return Decision(replicas, reason)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))
