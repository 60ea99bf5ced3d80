"""Prometheus metrics for one pdserve process.

Each process owns one :class:`Metrics`, backed by its own ``CollectorRegistry`` rather than
prometheus-client's global one, so a test (or a process hosting several components) can
create as many as it likes without "duplicated timeseries" errors. Metric names get the
``pdserve_`` prefix; units follow Prometheus conventions (seconds, bytes, ``_total`` for
counters, which prometheus-client appends itself).

Roles define their own metric sets on top of this::

    metrics = Metrics()
    ttft = metrics.histogram("ttft_seconds", "Time to first token", ["pool"])
    port = metrics.start_http()   # http://127.0.0.1:<port>/metrics
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import start_http_server as _start_http_server

NAMESPACE = "pdserve"

# Latency buckets in seconds, 1 ms .. 60 s: wide enough for ITL on a GPU and TTFT on a CPU.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

_M = TypeVar("_M", Counter, Gauge, Histogram)


class Metrics:
    """A process's metric registry and, optionally, its HTTP exposition endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._metrics: dict[str, Counter | Gauge | Histogram] = {}
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return self._get_or_create(Counter, name, doc, labels)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return self._get_or_create(Gauge, name, doc, labels)

    def histogram(
        self,
        name: str,
        doc: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS_S,
    ) -> Histogram:
        return self._get_or_create(Histogram, name, doc, labels, buckets=tuple(buckets))

    def render(self) -> bytes:
        """The exposition text, as a scrape would see it."""
        return generate_latest(self.registry)

    def start_http(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` (0 = a free port) in a thread; returns the port."""
        if self._http is not None:
            raise RuntimeError("metrics HTTP server already running")
        server, thread = _start_http_server(port, addr=host, registry=self.registry)
        self._http = (server, thread)
        return int(server.server_port)

    def stop_http(self) -> None:
        if self._http is None:
            return
        server, thread = self._http
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        self._http = None

    def _get_or_create(
        self,
        kind: type[_M],
        name: str,
        doc: str,
        labels: Sequence[str],
        **kwargs: object,
    ) -> _M:
        # Two components of one process may ask for the same metric; hand back the same
        # object instead of letting prometheus-client raise on the duplicate.
        existing = self._metrics.get(name)
        if existing is not None:
            if not isinstance(existing, kind):
                raise ValueError(f"metric {name!r} exists as a {type(existing).__name__}")
            return existing
        metric = kind(
            name,
            doc,
            labelnames=tuple(labels),
            namespace=NAMESPACE,
            registry=self.registry,
            **kwargs,
        )
        self._metrics[name] = metric
        return metric
