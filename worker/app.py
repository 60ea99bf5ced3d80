"""The contract between the worker runtime and a role: :class:`WorkerApp`.

Each role's ``wiring`` module builds its app (``prefill_worker.wiring``,
``decode_worker.wiring``) from a :class:`~worker.config.WorkerConfig`; the runtime serves
it and, at the end of the drain, closes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from common.grpc_server import AddServicerFn
from common.kv_events import KVEvent
from common.metrics import Metrics
from common.worker_info import BlockGeometry, WorkerRole
from worker.config import WorkerConfig
from worker.snapshot import WorkerSnapshot


class WorkerApp(Protocol):
    """What a role hands the runtime: its services, its state, and how to stop it."""

    role: WorkerRole
    kv_address: str | None  # the KV receiver's host:port (decode workers only)
    geometry: BlockGeometry
    services: Sequence[tuple[AddServicerFn, Any]]
    service_names: Sequence[str]

    def snapshot(self) -> WorkerSnapshot:
        """Cheap, possibly one engine step old: for heartbeats and gauges."""
        ...

    async def status(self) -> WorkerSnapshot:
        """Exact as of the end of the current engine step: for ``GetStatus``."""
        ...

    async def take_kv_events(self) -> list[KVEvent]:
        """Drain the prefix cache's events (the runtime publishes or drops them)."""
        ...

    def begin_drain(self) -> None:
        """From now on refuse new requests with UNAVAILABLE."""
        ...

    def in_flight(self) -> int: ...

    async def close(self) -> None: ...


# A role's wiring function: (config, worker id, the runtime's metrics) → its app. Called
# inside the running event loop (the engine thread posts results to it).
AppType = Callable[[WorkerConfig, str, Metrics], WorkerApp]
