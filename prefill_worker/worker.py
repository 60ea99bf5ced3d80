"""Wiring of one prefill worker process: engine (with the send hook), KV sender, service.

:class:`PrefillApp` is what :class:`~common.worker_runtime.WorkerRuntime` serves. The
engine's per-layer hook is the :class:`~prefill_worker.sends.SendTracker`, which starts
each prompt's KV send from inside the step that computes it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from common.grpc_server import AddServicerFn
from common.kv_events import KVEvent
from common.metrics import Metrics
from common.worker_config import WorkerConfig
from common.worker_info import WorkerRole
from common.worker_runtime import WorkerSnapshot
from engine.async_engine import AsyncEngine, EngineStats
from engine.llm_engine import LLMEngine
from kv_transfer.sender import TorchDistSender
from prefill_worker.prefill import Prefiller
from prefill_worker.sends import SendTracker
from prefill_worker.service import SERVICE_NAME, PrefillServicer
from prefill_worker.stats import PrefillStats
from proto import worker_pb2_grpc


class PrefillApp:
    """Build inside a running event loop (the engine thread posts results to it)."""

    role = WorkerRole.PREFILL
    kv_address = None  # senders connect to receivers; nothing connects to us

    def __init__(self, config: WorkerConfig, worker_id: str, metrics: Metrics) -> None:
        if config.role is not WorkerRole.PREFILL:
            raise ValueError(f"a prefill app cannot run role {config.role.value}")
        engine = LLMEngine(config.engine)
        self.geometry = engine.geometry()
        # Receivers tell pairs apart by name: a restarted worker must not reuse the old one.
        self.sender = TorchDistSender(
            engine.kv_cache,
            engine.model_config.name,
            config.kv_transfer,
            name=f"{worker_id}-{os.getpid()}",
        )
        # The hook needs the engine to free requests and the engine needs the hook: the
        # late-bound lambda closes the loop.
        self.sends = SendTracker(
            self.sender, engine.model_config.num_layers, lambda rid: self._free(rid)
        )
        self.engine = AsyncEngine(engine, after_layer=self.sends.after_layer)
        self.prefiller = Prefiller(self.engine, self.sends, PrefillStats(metrics))
        self.services: Sequence[tuple[AddServicerFn, Any]] = [
            (worker_pb2_grpc.add_PrefillWorkerServicer_to_server, PrefillServicer(self.prefiller))
        ]
        self.service_names: Sequence[str] = [SERVICE_NAME]
        self.engine.start()

    def _free(self, request_id: str) -> None:
        # Aborting a finished hold_blocks request releases its blocks (to the prefix cache).
        self.engine.submit(lambda engine: engine.abort(request_id))

    def snapshot(self) -> WorkerSnapshot:
        return self._snapshot(self.engine.stats)

    async def status(self) -> WorkerSnapshot:
        return self._snapshot(await self.engine.exact_stats())

    def _snapshot(self, s: EngineStats) -> WorkerSnapshot:
        in_flight = self.sends.in_flight
        waiting = max(self.sends.tracked - in_flight, 0)
        return WorkerSnapshot(
            waiting=waiting,
            running=s.running,
            free_blocks=s.free_blocks,
            used_blocks=s.used_blocks,
            cached_blocks=s.cached_blocks,
            total_blocks=s.total_blocks,
            in_flight_transfers=in_flight,
            queues={"waiting": waiting, "engine_waiting": s.waiting, "in_flight": in_flight},
            queued_prefill_tokens=self.prefiller.queued_tokens,
            ttft_ms_recent=self.prefiller.ttft_window.mean_ms(),
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
