"""One pdserve worker (prefill, decode or colocated) living inside a Serve replica.

The worker is the same object graph as ``python -m prefill_worker`` builds — a
:class:`~worker.runtime.WorkerRuntime` serving the role's app — run on a
:class:`~deploy.hosting.LoopThread` instead of a process's main loop. Lifecycle::

    start     thread: WorkerRuntime + the role's app (loads the model, starts the engine
              thread), then runtime.serve(app): gRPC server, /metrics, registration in
              Redis with a heartbeat, KV event publishing
    ready     wait_ready(): the worker id is registered and its gRPC health is SERVING
    serve     check_health() for Serve's health checks; autoscaling_stats() for
              record_autoscaling_stats(); replica_stats() for `pdserve status`
    stop      stop(): runtime.request_stop() → the runtime's own drain (refuse new work,
              health NOT_SERVING, deregister, finish in-flight requests within
              drain_grace_s, stop the server, close the app) → the thread ends

The worker id is ``<role>-<Serve replica id>``, so registry entries, logs and Serve's
replica list name the same thing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from common.registry import SyncRegistryReader
from common.worker_info import WorkerInfo, WorkerRole
from deploy.hosting import LoopThread, grpc_health
from deploy.latency import RecentQuantile
from deploy.replica_stats import ReplicaStats
from deploy.scaling import (
    ITL_P90_MS,
    KV_BLOCK_USE,
    QUEUE_TIME_P90_MS,
    QUEUED_PREFILL_TOKENS,
    TTFT_P90_MS,
)
from worker.app import WorkerApp
from worker.config import WorkerConfig
from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


class WorkerHost:
    def __init__(self, config: WorkerConfig, latency_window_s: float = 10.0) -> None:
        if config.redis_url is None:
            raise ValueError(
                "worker replicas need a registry: set args.redis_url or $PDSERVE_REDIS_URL"
            )
        self.config = config
        self.worker_id = config.worker_id
        self.info: WorkerInfo | None = None
        self._window_s = latency_window_s
        self._thread = LoopThread(config.worker_id)
        self._runtime: WorkerRuntime | None = None
        self._ttft: RecentQuantile | None = None
        self._itl: RecentQuantile | None = None
        self._stopping = False

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start(self._main)

    async def wait_ready(self, timeout_s: float = 300.0) -> WorkerInfo:
        """Until registered and SERVING; raises the worker's own error if it died first."""
        assert self.config.redis_url is not None
        reader = SyncRegistryReader(
            self.config.redis_url,
            self.config.namespace,
            password_file=self.config.redis_password_file,
        )
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                self._raise_if_dead()
                workers = await asyncio.to_thread(reader.list_workers)
                info = next((w for w in workers if w.worker_id == self.worker_id), None)
                if info is not None:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.worker_id}: not registered after {timeout_s}s")
                await asyncio.sleep(0.1)
        finally:
            reader.close()
        self.info = info
        await self.check_health()
        log.info("%s ready: gRPC %s kv %s", self.worker_id, info.grpc_address, info.kv_address)
        return info

    async def stop(self) -> None:
        """Drain, then stop; returns once the worker is gone (or the grace is over)."""
        self._stopping = True
        runtime = self._runtime
        if runtime is not None:
            self._thread.call_soon(runtime.request_stop)
        if not await self._thread.wait(self.config.drain_grace_s + 10.0):
            log.warning("%s: still draining at the end of the grace period", self.worker_id)

    # ---- while serving -------------------------------------------------------------------

    async def check_health(self) -> None:
        """Raise unless the worker's thread is alive and its gRPC health says SERVING."""
        self._raise_if_dead()
        if self.info is None:
            raise RuntimeError(f"{self.worker_id}: not ready")
        status = await asyncio.to_thread(grpc_health, self.info.grpc_address, 5.0)
        if status != "SERVING":
            raise RuntimeError(f"{self.worker_id}: gRPC health {status}")

    def autoscaling_stats(self) -> dict[str, float]:
        """What the pool's autoscaling policy reads (see :mod:`deploy.scaling`).

        Latency p90s (queue time included) are left out while the window holds no sample:
        "no traffic" must not read as "0 ms".
        """
        runtime = self._runtime
        if runtime is None or self._ttft is None or self.info is None:
            return {}  # not serving yet
        s = runtime.snapshot()
        stats = {
            QUEUED_PREFILL_TOKENS: float(s.queued_prefill_tokens),
            KV_BLOCK_USE: s.used_blocks / s.total_blocks if s.total_blocks else 0.0,
        }
        ttft = self._ttft.quantile(0.9)
        if ttft is not None:
            stats[TTFT_P90_MS] = ttft * 1000.0
        itl = self._itl.quantile(0.9) if self._itl is not None else None
        if itl is not None:
            stats[ITL_P90_MS] = itl * 1000.0
        if s.queue_time_ms_recent is not None:
            stats[QUEUE_TIME_P90_MS] = float(s.queue_time_ms_recent)
        return stats

    def replica_stats(self, deployment: str, replica_id: str) -> ReplicaStats | None:
        """This replica's line in `pdserve status`."""
        runtime = self._runtime
        if runtime is None or self.info is None:
            return None
        s = runtime.snapshot()
        return ReplicaStats(
            worker_id=self.worker_id,
            deployment=deployment,
            replica_id=replica_id,
            role=self.config.role.value,
            pool=self.config.pool,
            grpc_address=self.info.grpc_address,
            pid=os.getpid(),
            kv_block_use=s.used_blocks / s.total_blocks if s.total_blocks else 0.0,
            prefix_hit_rate=self._prefix_hit_rate(runtime),
            ttft_p90_ms=_ms(self._ttft.quantile(0.9) if self._ttft else None),
            itl_p90_ms=_ms(self._itl.quantile(0.9) if self._itl else None),
            queue_time_p90_ms=s.queue_time_ms_recent,
        )

    # ---- internals -----------------------------------------------------------------------

    async def _main(self) -> None:
        runtime = WorkerRuntime(self.config)
        app = _build_app(self.config, runtime)
        metrics = runtime.metrics
        # Both roles' stats modules created these; get-or-create hands back the same ones.
        self._ttft = RecentQuantile(metrics.histogram("ttft_seconds", ""), self._window_s)
        if self.config.role is not WorkerRole.PREFILL:
            self._itl = RecentQuantile(metrics.histogram("itl_seconds", ""), self._window_s)
        self._runtime = runtime
        if self._stopping:  # stop() came while the model loaded: serve, then drain at once
            runtime.request_stop()
        await runtime.serve(app)

    def _prefix_hit_rate(self, runtime: WorkerRuntime) -> float | None:
        # Prefill workers count both sides of the ratio; decode workers have no prompt
        # token counter (their hits are the prefill workers').
        if self.config.role is not WorkerRole.PREFILL:
            return None
        hits = _counter_total(runtime, "prefix_hit_tokens")
        prompt = _counter_total(runtime, "prompt_tokens")
        return hits / prompt if prompt else None

    def _raise_if_dead(self) -> None:
        error = self._thread.error
        if error is not None:
            raise RuntimeError(f"{self.worker_id} failed: {error!r}") from error
        if not self._thread.running:
            raise RuntimeError(f"{self.worker_id} has stopped")


def _build_app(config: WorkerConfig, runtime: WorkerRuntime) -> WorkerApp:
    # torch and the model load here, on the worker's thread, not in Serve's loop.
    if config.role is WorkerRole.PREFILL:
        from prefill_worker.wiring import build_prefill_app

        return build_prefill_app(config, runtime.worker_id, runtime.metrics)
    from decode_worker.wiring import build_decode_app

    return build_decode_app(config, runtime.worker_id, runtime.metrics)


def _counter_total(runtime: WorkerRuntime, name: str) -> float:
    total = 0.0
    for family in runtime.metrics.counter(name, "").collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                total += sample.value
    return total


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0
