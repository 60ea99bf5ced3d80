"""One decode (or colocated) worker's app: the engine, the KV receiver, the service.

A decode worker runs a KV receiver that prefill workers send into; a colocated worker has
none and prefills every request itself — the same ``Decode`` API over one engine, the
baseline disaggregation is measured against. :class:`DecodeApp` is what
:class:`~worker.runtime.WorkerRuntime` serves; it is given its engine, receiver and
prefill client (:func:`decode_worker.wiring.build_decode_app` builds the real ones) and
owns them from then on: :meth:`DecodeApp.close` closes all three.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common.grpc_server import AddServicerFn
from common.kv_events import KVEvent
from common.metrics import Metrics
from common.worker_info import WorkerRole
from decode_worker.decode import DecodePolicy, Decoder
from decode_worker.prefill_client import PrefillClient
from decode_worker.service import SERVICE_NAME, DecodeServicer
from decode_worker.stats import DecodeStats
from engine.async_engine import AsyncEngine, EngineStats
from kv_transfer.interfaces import KVReceiver
from proto import worker_pb2_grpc
from worker.admission import WorkerAdmission
from worker.config import WorkerConfig
from worker.snapshot import WorkerSnapshot


class DecodeApp:
    """Build inside a running event loop (the engine thread posts results to it); the
    engine must not be started yet (the app starts it)."""

    def __init__(
        self,
        config: WorkerConfig,
        worker_id: str,
        engine: AsyncEngine,
        receiver: KVReceiver | None,  # None: colocated, every request is prefilled here
        prefill: PrefillClient,
        metrics: Metrics,
    ) -> None:
        if config.role not in (WorkerRole.DECODE, WorkerRole.COLOCATED):
            raise ValueError(f"a decode app cannot run role {config.role.value}")
        self.role = config.role
        self.geometry = engine.geometry
        self.engine = engine
        self.receiver = receiver
        self.kv_address = str(receiver.address) if receiver is not None else None
        self._prefill_client = prefill
        self._stats = DecodeStats(metrics)
        policy = DecodePolicy(
            worker_id=worker_id,
            prefill_timeout_s=config.prefill_timeout_s,
            on_prefill_failure=config.on_prefill_failure,
            layer_wise=config.layer_wise,
        )
        self.queue = WorkerAdmission(
            f"decode worker {worker_id}",
            config.active_limit,
            config.admission_queue_size,
            metrics,
        )
        self.decoder = Decoder(policy, engine, receiver, prefill, self._stats, self.queue)
        self.services: Sequence[tuple[AddServicerFn, Any]] = [
            (worker_pb2_grpc.add_DecodeWorkerServicer_to_server, DecodeServicer(self.decoder))
        ]
        self.service_names: Sequence[str] = [SERVICE_NAME]
        engine.start()

    def snapshot(self) -> WorkerSnapshot:
        return self._snapshot(self.engine.stats)

    async def status(self) -> WorkerSnapshot:
        return self._snapshot(await self.engine.exact_stats())

    def _snapshot(self, s: EngineStats) -> WorkerSnapshot:
        prealloc, transfer = self.decoder.prealloc_depth, self.decoder.in_transfer
        admission = self.queue.queued
        return WorkerSnapshot(
            waiting=admission + prealloc + transfer + s.waiting,
            running=s.running,
            free_blocks=s.free_blocks,
            used_blocks=s.used_blocks,
            cached_blocks=s.cached_blocks,
            total_blocks=s.total_blocks,
            in_flight_transfers=transfer,
            queues={
                "admission": admission,
                "prealloc": prealloc,
                "transfer": transfer,
                "engine_waiting": s.waiting,
                "running": s.running,
            },
            ttft_ms_recent=self._stats.ttft_window.mean_ms(),
            itl_ms_recent=self._stats.itl_window.mean_ms(),
            queue_time_ms_recent=self.queue.queue_time_ms(),
            admission_limit=self.queue.limit,
        )

    async def take_kv_events(self) -> list[KVEvent]:
        # Drained even when nobody publishes them: the block manager's list is unbounded.
        return await self.engine.call(lambda engine: engine.take_kv_events())

    def begin_drain(self) -> None:
        self.decoder.draining = True

    def in_flight(self) -> int:
        return self.decoder.active

    async def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
        await self._prefill_client.close()
        self.engine.stop()
