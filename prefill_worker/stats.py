"""What a prefill worker measures, as Prometheus series."""

from __future__ import annotations

from common.metrics import Metrics
from engine.outputs import StepOutput
from kv_transfer.metrics import DURATION_BUCKETS, TransferMetrics


class PrefillStats:
    def __init__(self, metrics: Metrics) -> None:
        self._ttft = metrics.histogram(
            "ttft_seconds", "Time to first token on the prefill worker, RPC arrival on"
        )
        self._prompt_tokens = metrics.counter("prompt_tokens", "Prompt tokens prefilled")
        self._prefix_hits = metrics.counter(
            "prefix_hit_tokens", "Prompt tokens served by the prefix cache"
        )
        self._requests = metrics.counter("requests", "Finished Prefill calls", ["outcome"])
        self._kv_bytes = metrics.counter("kv_transfer_bytes", "KV bytes sent", ["role"])
        self._kv_seconds = metrics.histogram(
            "kv_transfer_seconds", "KV transfer durations", ["role"], buckets=DURATION_BUCKETS
        )
        self._kv_failures = metrics.counter(
            "kv_transfer_failures", "Failed transfers", ["role", "kind"]
        )

    def prefilled(self, seconds: float, out: StepOutput) -> None:
        self._ttft.observe(seconds)
        self._prompt_tokens.inc(out.prompt_tokens)
        self._prefix_hits.inc(out.cached_tokens)

    def finished(self, outcome: str) -> None:
        self._requests.labels(outcome).inc()

    def transfer(self, m: TransferMetrics | None) -> None:
        if m is None:
            return
        role = m.role.value
        if m.failure is None:
            self._kv_bytes.labels(role).inc(m.bytes)
            self._kv_seconds.labels(role).observe(m.duration_s)
        else:
            self._kv_failures.labels(role, m.failure).inc()
