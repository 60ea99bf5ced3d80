"""The line each of our server processes prints on stdout once it serves: formatted and
parsed here only.

A worker process (``python -m prefill_worker`` / ``python -m decode_worker``) prints,
after its gRPC server started and it registered::

    <role> worker <id> serving gRPC on H:P kv H:P|- metrics H:P|-

a router (``python -m router``)::

    router serving gRPC on H:P http H:P|- metrics H:P|- pools a,b

and ``pdserve up``, once the whole cluster is healthy, one line per public port::

    serving gRPC on H:P
    serving HTTP on H:P

``-`` stands for "none": a prefill or colocated worker runs no KV receiver, a process
without ``metrics_port`` serves no ``/metrics``. Launchers (tests, benchmarks, loadgen)
read the child's stdout line by line and hand each line to the matching ``parse_*``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NONE = "-"
_LINE = re.compile(
    r"^(?P<role>\w+) worker (?P<worker_id>\S+) serving gRPC on (?P<grpc>\S+) "
    r"kv (?P<kv>\S+) metrics (?P<metrics>\S+)$"
)


@dataclass(frozen=True, slots=True)
class Ready:
    """What a worker's ready line says."""

    role: str  # prefill | decode | colocated
    worker_id: str  # as registered
    grpc_address: str  # host:port of its gRPC server
    kv_address: str | None  # host:port of its KV receiver; None: it runs none
    metrics_address: str | None  # host:port of /metrics; None: not served


def format_ready(
    role: str,
    worker_id: str,
    grpc_address: str,
    kv_address: str | None,
    metrics_address: str | None,
) -> str:
    """The ready line (without the newline)."""
    return (
        f"{role} worker {worker_id} serving gRPC on {grpc_address} "
        f"kv {kv_address or _NONE} metrics {metrics_address or _NONE}"
    )


def parse_ready(line: str) -> Ready | None:
    """The :class:`Ready` a line announces; None for any other line (logs, blank)."""
    match = _LINE.match(line.strip())
    if match is None:
        return None
    return Ready(
        role=match["role"],
        worker_id=match["worker_id"],
        grpc_address=match["grpc"],
        kv_address=_optional(match["kv"]),
        metrics_address=_optional(match["metrics"]),
    )


def _optional(value: str) -> str | None:
    return None if value == _NONE else value


@dataclass(frozen=True, slots=True)
class RouterReady:
    """What a router's ready line says."""

    grpc_address: str  # host:port of the public gRPC server
    http_address: str | None  # host:port of the OpenAI-compatible HTTP server; None: none
    metrics_address: str | None  # host:port of /metrics; None: not served
    pools: tuple[str, ...]  # the pools it routes to


_ROUTER_LINE = re.compile(r"^router serving gRPC on (\S+) http (\S+) metrics (\S+) pools (\S+)$")
_UP_PREFIX = "serving gRPC on "
_UP_HTTP_PREFIX = "serving HTTP on "


def format_router_ready(
    grpc_address: str,
    http_address: str | None,
    metrics_address: str | None,
    pools: tuple[str, ...],
) -> str:
    return (
        f"router serving gRPC on {grpc_address} http {http_address or _NONE} "
        f"metrics {metrics_address or _NONE} pools {','.join(pools)}"
    )


def parse_router_ready(line: str) -> RouterReady | None:
    """The :class:`RouterReady` a line announces; None for any other line."""
    match = _ROUTER_LINE.match(line.strip())
    if match is None:
        return None
    grpc_address, http, metrics, pools = match.groups()
    return RouterReady(grpc_address, _optional(http), _optional(metrics), tuple(pools.split(",")))


def format_up_ready(endpoint: str) -> str:
    """``pdserve up``'s line: the cluster's public gRPC endpoint."""
    return f"{_UP_PREFIX}{endpoint}"


def parse_up_ready(line: str) -> str | None:
    """The endpoint ``pdserve up`` announces; None for any other line."""
    line = line.strip()
    return line.removeprefix(_UP_PREFIX) if line.startswith(_UP_PREFIX) else None


def format_up_http_ready(endpoint: str) -> str:
    """``pdserve up``'s second line: the cluster's OpenAI-compatible HTTP endpoint."""
    return f"{_UP_HTTP_PREFIX}{endpoint}"


def parse_up_http_ready(line: str) -> str | None:
    """The HTTP endpoint ``pdserve up`` announces; None for any other line."""
    line = line.strip()
    return line.removeprefix(_UP_HTTP_PREFIX) if line.startswith(_UP_HTTP_PREFIX) else None
