"""What a decode (or colocated) worker measures: Prometheus series plus the recent
TTFT / ITL windows its load reports carry to the routers."""

from __future__ import annotations

from common.errors import ErrorCode
from common.metrics import Metrics
from engine.speculative import SpeculativeStats
from kv_transfer.metrics import DURATION_BUCKETS, TransferMetrics
from worker.latency import LatencyWindow


class DecodeStats:
    def __init__(self, metrics: Metrics) -> None:
        self.ttft_window = LatencyWindow()
        self.itl_window = LatencyWindow()
        self._ttft = metrics.histogram("ttft_seconds", "Time to first token, request arrival on")
        self._itl = metrics.histogram("itl_seconds", "Inter-token latency")
        self._requests = metrics.counter("requests", "Finished Decode calls", ["outcome"])
        self._tokens = metrics.counter("generated_tokens", "Tokens streamed to clients")
        self._prefix_hits = metrics.counter(
            "prefix_hit_tokens", "Prompt tokens served by a prefix cache (here or on prefill)"
        )
        self._prefill_failures = metrics.counter(
            "prefill_failures", "Remote prefills that failed or timed out", ["reason"]
        )
        self._fallbacks = metrics.counter(
            "local_prefill_fallbacks", "Prefilled here after a failure"
        )
        self._kv_bytes = metrics.counter("kv_transfer_bytes", "KV bytes landed", ["role"])
        self._kv_seconds = metrics.histogram(
            "kv_transfer_seconds", "KV transfer durations", ["role"], buckets=DURATION_BUCKETS
        )
        self._spec = {
            name: metrics.gauge(f"speculative_{name}", doc)
            for name, doc in (
                ("draft_tokens", "Draft tokens verified (speculative decoding, since start)"),
                ("accepted_tokens", "Draft tokens accepted by the target model"),
                ("acceptance_rate", "accepted_tokens / draft_tokens"),
            )
        }
        self._kv_failures = metrics.counter(
            "kv_transfer_failures", "Failed transfers", ["role", "kind"]
        )

    def speculative(self, stats: SpeculativeStats) -> None:
        """Export the engine's speculative decoding counters (monotonic, set as gauges)."""
        self._spec["draft_tokens"].set(stats.num_draft_tokens)
        self._spec["accepted_tokens"].set(stats.num_accepted_tokens)
        self._spec["acceptance_rate"].set(stats.acceptance_rate)

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)
        self.ttft_window.add(seconds)

    def next_tokens(self, seconds: float, count: int) -> None:
        if count <= 0:
            return
        per_token = seconds / count
        self._itl.observe(per_token)
        self.itl_window.add(per_token)

    def finished(self, outcome: str, completion_tokens: int, cached_tokens: int) -> None:
        self._requests.labels(outcome).inc()
        self._tokens.inc(completion_tokens)
        self._prefix_hits.inc(cached_tokens)

    def rejected(self, code: ErrorCode) -> None:
        self._requests.labels(code.value.lower()).inc()  # label values stay lower case

    def prefill_failed(self, reason: str, fallback: bool) -> None:
        self._prefill_failures.labels(reason).inc()
        if fallback:
            self._fallbacks.inc()

    def transfer(self, m: TransferMetrics | None) -> None:
        if m is None:
            return
        role = m.role.value
        if m.failure is None:
            self._kv_bytes.labels(role).inc(m.bytes)
            self._kv_seconds.labels(role).observe(m.duration_s)
        else:
            self._kv_failures.labels(role, m.failure).inc()
