"""The process around a worker: gRPC server, registry heartbeat, metrics, signals, drain.

Prefill, decode and colocated workers differ in what they compute, not in how they live,
so their ``__main__`` modules parse a config and hand it, with their role's wiring
function (an :data:`~worker.app.AppType`), to :func:`run_worker`;
:meth:`WorkerRuntime.serve` owns the process lifecycle::

    start   gRPC server (the app's services + WorkerControl + health + reflection),
            /metrics over HTTP, registration in Redis with a heartbeat that publishes load,
            a loop that drains the app's KV events into the pool's stream
    ready   prints one line (:mod:`common.ready_line`):
            "<role> worker <id> serving gRPC on H:P kv H:P|- metrics H:P|-"
    serve   until SIGTERM / SIGINT
    drain   app refuses new work (UNAVAILABLE) → health NOT_SERVING → deregister →
            in-flight requests finish (up to drain_grace_s) → server stops → app closes

Torch-free: the engine lives behind the app (see :mod:`worker` for the other modules of
the process: the app contract, the ``GetStatus`` servicer, the load snapshot, the config).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable

from common.cluster_secret import load_secret
from common.grpc_auth import ClusterTokenInterceptor
from common.grpc_server import GrpcServer
from common.metrics import Metrics
from common.ready_line import format_ready
from common.registry import Registry
from common.worker_info import WorkerInfo, WorkerLoad, WorkerRole
from messages.status import WorkerStatus
from proto import worker_pb2_grpc
from worker.app import AppType, WorkerApp
from worker.config import WorkerConfig
from worker.control import CONTROL_SERVICE, ControlServicer
from worker.heartbeat import Heartbeat
from worker.snapshot import WorkerSnapshot

log = logging.getLogger(__name__)


class WorkerRuntime:
    """One per worker process; see the module docstring for the lifecycle."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.worker_id = config.worker_id or _generate_id(config.role)
        self.metrics = Metrics()
        self.secret = load_secret(config.cluster_secret_file)  # None: an open worker
        self.draining = False
        self._app: WorkerApp | None = None
        self._stop = asyncio.Event()
        m = self.metrics
        self._queue_gauge = m.gauge("queue_depth", "Requests per lifecycle queue", ["queue"])
        self._running_gauge = m.gauge("running_requests", "Requests in the running batch")
        self._blocks_gauge = m.gauge("kv_blocks", "KV blocks by state", ["state"])
        self._transfers_gauge = m.gauge("kv_transfers_in_flight", "Unfinished KV transfers")
        self._events_counter = m.counter("kv_events_published", "KV events sent to Redis")

    def snapshot(self) -> WorkerSnapshot:
        if self._app is None:
            raise RuntimeError("no app is being served")
        return self._app.snapshot()

    async def status(self) -> WorkerSnapshot:
        if self._app is None:
            raise RuntimeError("no app is being served")
        return await self._app.status()

    async def worker_status(self) -> WorkerStatus:
        """What ``GetStatus`` answers: identity, exact load, draining."""
        s = await self.status()
        return WorkerStatus(
            worker_id=self.worker_id,
            role=self.config.role.value,
            pool=self.config.pool,
            waiting=s.waiting,
            running=s.running,
            free_blocks=s.free_blocks,
            used_blocks=s.used_blocks,
            cached_blocks=s.cached_blocks,
            total_blocks=s.total_blocks,
            in_flight_transfers=s.in_flight_transfers,
            draining=self.draining,
        )

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self, app: WorkerApp) -> int:
        """Run ``app`` until a signal (or :meth:`request_stop`), then drain; exit status."""
        self._app = app
        cfg = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        server = GrpcServer(
            cfg.host,
            cfg.port,
            [
                *app.services,
                (
                    worker_pb2_grpc.add_WorkerControlServicer_to_server,
                    ControlServicer(self.worker_status),
                ),
            ],
            [*app.service_names, CONTROL_SERVICE],
            interceptors=[ClusterTokenInterceptor(self.secret)] if self.secret else [],
        )
        await server.start()
        metrics_address = None
        if cfg.metrics_port is not None:
            metrics_address = f"{cfg.host}:{self.metrics.start_http(cfg.metrics_port, cfg.host)}"
        registry, heartbeat = await self._register(app, server.address)
        ticker = asyncio.create_task(self._tick(app, registry), name="worker-tick")
        ready = format_ready(
            cfg.role.value, self.worker_id, server.address, app.kv_address, metrics_address
        )
        print(ready, flush=True)
        try:
            await self._stop.wait()
            log.info("%s: draining", self.worker_id)
            await self._drain(app, server, heartbeat)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            if registry is not None:
                await registry.aclose()
            await app.close()
            self.metrics.stop_http()
        log.info("%s: stopped", self.worker_id)
        return 0

    async def _register(
        self, app: WorkerApp, grpc_address: str
    ) -> tuple[Registry | None, Heartbeat | None]:
        cfg = self.config
        if cfg.redis_url is None:
            log.warning("%s: no redis_url; not registering", self.worker_id)
            return None, None
        registry = Registry(
            cfg.redis_url,
            cfg.namespace,
            cfg.heartbeat_ttl_s,
            password_file=cfg.redis_password_file,
            secret=self.secret,
        )
        info = WorkerInfo(
            worker_id=self.worker_id,
            role=cfg.role,
            pool=cfg.pool,
            model=app.geometry.model,
            grpc_address=grpc_address,
            kv_address=app.kv_address,
            geometry=app.geometry,
        )
        heartbeat = Heartbeat(registry, info, self._load, cfg.heartbeat_interval_s)
        await heartbeat.start()
        return registry, heartbeat

    def _load(self) -> WorkerLoad:
        s = self.snapshot()
        return WorkerLoad(
            worker_id=self.worker_id,
            queued=s.waiting,
            running=s.running,
            free_blocks=s.free_blocks,
            used_blocks=s.used_blocks,
            cached_blocks=s.cached_blocks,
            ttft_ms_recent=s.ttft_ms_recent,
            itl_ms_recent=s.itl_ms_recent,
            queued_prefill_tokens=s.queued_prefill_tokens,
            draining=self.draining,
            kv_peers=s.kv_peers,
        )

    async def _tick(self, app: WorkerApp, registry: Registry | None) -> None:
        """Every heartbeat interval: refresh gauges, publish the prefix cache's events."""
        # Every role announces its prefix cache: a decode worker's holds the prompts it
        # prefilled itself and the blocks it landed from prefill workers, which the router
        # weighs when it decides to prefill there instead (conditional disaggregation).
        publish = registry is not None
        failing = False
        while True:
            try:
                self._export(app.snapshot())
                events = await app.take_kv_events()
                if events and publish:
                    assert registry is not None
                    await registry.publish_kv_events(self.worker_id, events)
                    self._events_counter.inc(len(events))
                failing = False
            except Exception as exc:  # keep ticking: a Redis outage must not stop metrics
                if not failing:  # the first failure of a streak, not one per tick
                    log.warning("%s: publishing KV events failed: %s", self.worker_id, exc)
                failing = True
            await asyncio.sleep(self.config.heartbeat_interval_s)

    def _export(self, s: WorkerSnapshot) -> None:
        for queue, depth in s.queues.items():
            self._queue_gauge.labels(queue).set(depth)
        self._running_gauge.set(s.running)
        self._blocks_gauge.labels("used").set(s.used_blocks)
        self._blocks_gauge.labels("free").set(s.free_blocks)
        self._blocks_gauge.labels("cached").set(s.cached_blocks)
        self._transfers_gauge.set(s.in_flight_transfers)

    async def _drain(self, app: WorkerApp, server: GrpcServer, heartbeat: Heartbeat | None) -> None:
        self.draining = True
        app.begin_drain()
        for name in ["", *app.service_names, CONTROL_SERVICE]:
            await server.set_serving(name, False)
        if heartbeat is not None:
            await heartbeat.stop()  # deregisters: routers stop sending at once
        deadline = time.monotonic() + self.config.drain_grace_s
        while app.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if app.in_flight():
            log.warning(
                "%s: %d requests still running at the end of the grace period",
                self.worker_id,
                app.in_flight(),
            )
        await server.stop(grace_s=1.0)


def run_worker(config: WorkerConfig, load_app: Callable[[], AppType]) -> int:
    """A worker process's body after its arguments parsed: log to stderr, build the app
    with the wiring function ``load_app()`` returns — it imports it, so torch loads only
    once argument errors were reported — and serve until drained. Returns the exit code."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(_serve(config, load_app()))


async def _serve(config: WorkerConfig, app_type: AppType) -> int:
    runtime = WorkerRuntime(config)
    return await runtime.serve(app_type(config, runtime.worker_id, runtime.metrics))


def _generate_id(role: WorkerRole) -> str:
    return f"{role.value}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
