"""The one line a worker prints on stdout once it serves: formatted and parsed here only.

A worker process (``python -m prefill_worker`` / ``python -m decode_worker``) prints,
after its gRPC server started and it registered::

    <role> worker <id> serving gRPC on H:P kv H:P|- metrics H:P|-

``-`` stands for "none": a prefill or colocated worker runs no KV receiver, a worker
without ``metrics_port`` serves no ``/metrics``. Launchers (tests, benchmarks, loadgen)
read the child's stdout line by line and hand each line to :func:`parse_ready`.
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
