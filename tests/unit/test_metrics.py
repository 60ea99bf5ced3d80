"""Per-process Prometheus registries: prefixing, reuse, isolation, HTTP exposition."""

from __future__ import annotations

import urllib.request

import pytest

from common.metrics import Metrics


def test_metrics_are_prefixed_reused_and_isolated() -> None:
    first, second = Metrics(), Metrics()
    requests = first.counter("requests", "requests served", labels=("status",))
    assert first.counter("requests", "requests served", labels=("status",)) is requests
    requests.labels(status="ok").inc(3)
    second.counter("requests", "requests served", labels=("status",)).labels(status="ok").inc()
    assert b'pdserve_requests_total{status="ok"} 3.0' in first.render()
    assert b'pdserve_requests_total{status="ok"} 1.0' in second.render()
    with pytest.raises(ValueError):
        first.gauge("requests", "same name, other type")


def test_http_exposition_on_loopback() -> None:
    metrics = Metrics()
    metrics.histogram("ttft_seconds", "time to first token").observe(0.25)
    port = metrics.start_http(0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            body = reply.read()
        assert b"pdserve_ttft_seconds_count 1.0" in body
    finally:
        metrics.stop_http()
