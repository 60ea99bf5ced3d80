"""The router's Prometheus metrics (names get the ``pdserve_router_`` prefix).

- ``requests_total{pool, route, status}``: finished requests by gRPC status name and
  semantic route (``""`` when none matched; pool ``""`` when rejected before routing)
- ``ttft_seconds``, ``itl_seconds``, ``e2e_seconds`` ``{pool}``: as the client sees them
- ``routing_decision_seconds{pool, policy}``: prefix match + policy, per attempt
- ``prefix_hit_ratio{pool, policy}``: predicted cached / prompt tokens of routed requests,
  and the counters behind it (``prompt_tokens_total``, ``predicted_cached_tokens_total``,
  ``cached_tokens_total`` as the workers reported them), so a dashboard can take ratios
  of rates
- ``prefill_decisions_total{pool, mode, reason}``: conditional disaggregation's choice per
  attempt (mode ``remote`` | ``local``; reasons in ``router.disagg_policy``), only in pools
  with ``conditional`` thresholds
- ``migrations_total{pool, cause}``: streams resumed on another decode worker after their
  first token (cause ``worker_died`` | ``drained`` | ``stream_broken``, router.migration),
  and ``migration_seconds{pool}``: from the break to the resumed stream's next token
- ``admission_queue_depth{pool}``, ``admission_queue_seconds{pool}``: requests waiting in
  the pool's admission queue, and each request's wait there (router.admission)
- ``rejections_total{pool, reason}``: refusals for overload (``queue_full`` |
  ``displaced`` | ``deadline`` | ``workers_full`` | ``too_large``)
- ``prefix_index_entries{pool}``, ``prefix_index_bytes{pool}`` (an estimate),
  ``prefix_index_evicted{pool}`` (entries evicted, ever): the prefix index's size against its cap
  (``max_indexed_blocks``), set at every registry refresh
- ``retries_total{pool, reason}``, ``in_flight``, ``semantic_seconds``
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.metrics import LATENCY_BUCKETS_S, Metrics

_DECISION_BUCKETS_S = (
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    5e-2,
)
_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
_ITL_BUCKETS_S = (0.0005, *LATENCY_BUCKETS_S)


class RouterMetrics:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()
        m = self.metrics
        self.requests = m.counter(
            "router_requests", "Finished requests", ["pool", "route", "status"]
        )
        self.ttft = m.histogram("router_ttft_seconds", "Time to first token", ["pool"])
        self.itl = m.histogram(
            "router_itl_seconds", "Inter-token latency", ["pool"], buckets=_ITL_BUCKETS_S
        )
        self.e2e = m.histogram("router_e2e_seconds", "Request latency, end to end", ["pool"])
        self.decision = m.histogram(
            "router_routing_decision_seconds",
            "Time to pick workers (prefix match + policy)",
            ["pool", "policy"],
            buckets=_DECISION_BUCKETS_S,
        )
        self.prefix_hit_ratio = m.histogram(
            "router_prefix_hit_ratio",
            "Predicted cached share of each routed prompt",
            ["pool", "policy"],
            buckets=_RATIO_BUCKETS,
        )
        self.prompt_tokens = m.counter("router_prompt_tokens", "Prompt tokens routed", ["pool"])
        self.predicted_cached = m.counter(
            "router_predicted_cached_tokens", "Prompt tokens the index expected cached", ["pool"]
        )
        self.cached_tokens = m.counter(
            "router_cached_tokens", "Prompt tokens the workers reported cached", ["pool"]
        )
        self.retries = m.counter("router_retries", "Attempts after the first", ["pool", "reason"])
        self.migrations = m.counter(
            "router_migrations", "Streams resumed on another decode worker", ["pool", "cause"]
        )
        self.migration_seconds = m.histogram(
            "router_migration_seconds",
            "From a stream's break to its next token on another decode worker",
            ["pool"],
        )
        self.prefill_decisions = m.counter(
            "router_prefill_decisions",
            "Conditional disaggregation: prefill remotely or on the decode worker",
            ["pool", "mode", "reason"],
        )
        self.in_flight = m.gauge("router_in_flight", "Requests being served")
        self.index_entries = m.gauge(
            "router_prefix_index_entries", "(worker, block) entries in the prefix index", ["pool"]
        )
        self.index_bytes = m.gauge(
            "router_prefix_index_bytes", "Estimated memory of the prefix index", ["pool"]
        )
        self.index_evictions = m.gauge(
            "router_prefix_index_evicted",
            "Prefix-index entries evicted for the cap (max_indexed_blocks), ever",
            ["pool"],
        )
        self.admission_depth = m.gauge(
            "router_admission_queue_depth", "Requests waiting in a pool's admission queue", ["pool"]
        )
        self.admission_seconds = m.histogram(
            "router_admission_queue_seconds", "Time in a pool's admission queue", ["pool"]
        )
        self.rejections = m.counter(
            "router_rejections", "Requests refused for overload", ["pool", "reason"]
        )
        self.semantic = m.histogram(
            "router_semantic_seconds", "Semantic classification time", buckets=_DECISION_BUCKETS_S
        )

        self._pools: dict[tuple[str, str], PoolMetrics] = {}

    def pool(self, pool: str, policy: str) -> PoolMetrics:
        """The per-pool series, bound once (``labels()`` costs microseconds per call)."""
        bound = self._pools.get((pool, policy))
        if bound is None:
            bound = PoolMetrics(
                ttft=self.ttft.labels(pool),
                itl=self.itl.labels(pool),
                e2e=self.e2e.labels(pool),
                decision=self.decision.labels(pool, policy),
                prefix_hit_ratio=self.prefix_hit_ratio.labels(pool, policy),
                prompt_tokens=self.prompt_tokens.labels(pool),
                predicted_cached=self.predicted_cached.labels(pool),
                cached_tokens=self.cached_tokens.labels(pool),
            )
            self._pools[(pool, policy)] = bound
        return bound


@dataclass(frozen=True, slots=True)
class PoolMetrics:
    """One pool's labelled children of the RouterMetrics series."""

    ttft: Any
    itl: Any
    e2e: Any
    decision: Any
    prefix_hit_ratio: Any
    prompt_tokens: Any
    predicted_cached: Any
    cached_tokens: Any
