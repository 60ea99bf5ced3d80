"""One prefill worker's app: the engine (with the send hook), the KV sender, the service.

:class:`PrefillApp` is what :class:`~worker.runtime.WorkerRuntime` serves; it is given
its engine and KV sender (:func:`prefill_worker.wiring.build_prefill_app` builds the real
ones) and owns them from then on: :meth:`PrefillApp.close` closes both. The engine's
per-layer hook is the :class:`~prefill_worker.sends.SendTracker`, which starts each
prompt's KV send from inside the step that computes it, and frees a prompt's blocks
through the engine's thread-safe ``abort`` once its send is over.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common.grpc_server import AddServicerFn
from common.kv_events import KVEvent
from common.metrics import Metrics
from common.worker_info import WorkerRole
from engine.async_engine import AsyncEngine, EngineStats
from kv_transfer.interfaces import KVSender
from prefill_worker.prefill import Prefiller
from prefill_worker.sends import SendTracker
from prefill_worker.service import SERVICE_NAME, PrefillServicer
from prefill_worker.stats import PrefillStats
from proto import worker_pb2_grpc
from worker.admission import WorkerAdmission
from worker.config import WorkerConfig
from worker.snapshot import WorkerSnapshot


class PrefillApp:
    """Build inside a running event loop (the engine thread posts results to it); the
    engine must not be started yet (the app sets its layer hook, then starts it)."""

    role = WorkerRole.PREFILL
    kv_address = None  # senders connect to receivers; nothing connects to us

    def __init__(
        self, config: WorkerConfig, engine: AsyncEngine, sender: KVSender, metrics: Metrics
    ) -> None:
        if config.role is not WorkerRole.PREFILL:
            raise ValueError(f"a prefill app cannot run role {config.role.value}")
        self.geometry = engine.geometry
        self.engine = engine
        self.sender = sender
        self.sends = SendTracker(sender, engine.layout.num_layers, engine.abort)
        engine.set_layer_hook(self.sends.after_layer)
        self.queue = WorkerAdmission(
            "prefill worker", config.active_limit, config.admission_queue_size, metrics
        )
        self.prefiller = Prefiller(engine, self.sends, PrefillStats(metrics), self.queue)
        self.services: Sequence[tuple[AddServicerFn, Any]] = [
            (worker_pb2_grpc.add_PrefillWorkerServicer_to_server, PrefillServicer(self.prefiller))
        ]
        self.service_names: Sequence[str] = [SERVICE_NAME]
        engine.start()

    def snapshot(self) -> WorkerSnapshot:
        return self._snapshot(self.engine.stats)

    async def status(self) -> WorkerSnapshot:
        return self._snapshot(await self.engine.exact_stats())

    def _snapshot(self, s: EngineStats) -> WorkerSnapshot:
        in_flight = self.sends.in_flight
        waiting = max(self.sends.tracked - in_flight, 0) + self.queue.queued
        return WorkerSnapshot(
            waiting=waiting,
            running=s.running,
            free_blocks=s.free_blocks,
            used_blocks=s.used_blocks,
            cached_blocks=s.cached_blocks,
            total_blocks=s.total_blocks,
            in_flight_transfers=in_flight,
            kv_peers=self.sender.peers(),
            queues={
                "admission": self.queue.queued,
                "waiting": waiting,
                "engine_waiting": s.waiting,
                "in_flight": in_flight,
            },
            queued_prefill_tokens=self.prefiller.queued_tokens,
            ttft_ms_recent=self.prefiller.ttft_window.mean_ms(),
            queue_time_ms_recent=self.queue.queue_time_ms(),
            admission_limit=self.queue.limit,
        )

    async def take_kv_events(self) -> list[KVEvent]:
        return await self.engine.call(lambda engine: engine.take_kv_events())

    def begin_drain(self) -> None:
        self.prefiller.draining = True

    def in_flight(self) -> int:
        return self.prefiller.active

    async def close(self) -> None:
        self.sender.close()
        self.engine.stop()
