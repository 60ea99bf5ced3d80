"""One router process's wiring: config in, serving gRPC and HTTP ports out.

Lifecycle (used by ``python -m router`` and by the Ray deployment alike)::

    server = RouterServer(config)          # nothing started yet
    await server.start()                   # tokenizers, semantic model (if routes), Redis
                                           # registry view + KV event follower, gRPC server
                                           # (Generation + health + reflection), the
                                           # OpenAI HTTP API (same Generator), /metrics
    server.address                         # "127.0.0.1:PORT" (gRPC)
    server.http_address                    # "127.0.0.1:PORT", or None without http_port
    await server.stop(grace_s)             # health NOT_SERVING, in-flight streams finish
                                           # within grace_s, then background tasks and Redis

Nothing here decides anything; it builds each collaborator once and hands it to the next.
"""

from __future__ import annotations

import asyncio
import logging

from common import env
from common.cluster_secret import load_secret
from common.grpc_server import GrpcServer
from common.registry import Registry
from proto import serving_pb2_grpc
from router.api_proto import SERVICE_NAME
from router.auth import ApiKeyInterceptor, load_keys
from router.channels import ChannelPool
from router.config import RouterConfig
from router.generation import Generator, PoolRuntime
from router.http_server import HttpServer, build_app
from router.index import PrefixIndex
from router.kv_follower import KVEventFollower
from router.metrics import RouterMetrics
from router.policies import make_policy
from router.registry_view import RegistryView
from router.semantic import MiniLMEmbedder, SemanticRouter
from router.service import GenerationServicer
from router.stream import DecodeStreamer
from router.tls import grpc_server_credentials, uvicorn_ssl_options
from router.tokenizer import ModelTokenizer
from router.tracker import WorkerTracker

log = logging.getLogger(__name__)

# Big enough that an oversize prompt reaches validation (INVALID_ARGUMENT with a reason)
# instead of being cut off by gRPC's 4 MiB default.
_MAX_MESSAGE_BYTES = 64 * 2**20


class RouterServer:
    def __init__(self, config: RouterConfig, metrics: RouterMetrics | None = None) -> None:
        if config.redis_url is None:
            raise ValueError("the router needs a redis_url (--redis-url or $PDSERVE_REDIS_URL)")
        self.config = config
        self.metrics = metrics or RouterMetrics()
        # The cluster secret: only signed registrations are routed to, and worker RPCs
        # carry its token (common.cluster_secret).
        secret = load_secret(config.cluster_secret_file)
        self.registry = Registry(
            config.redis_url,
            config.namespace,
            password_file=config.redis_password_file,
            secret=secret,
        )
        self.tracker = WorkerTracker(config.quarantine_s)
        self.channels = ChannelPool(secret=secret)
        self.indexes = {
            p.name: PrefixIndex(config.prediction_ttl_s, max_entries=config.max_indexed_blocks)
            for p in config.pools
        }
        self.view = RegistryView(
            self.registry,
            [p.name for p in config.pools],
            config.refresh_interval_s,
            on_refresh=self._on_refresh,
        )
        self.follower = KVEventFollower(self.registry, self.indexes)
        self.semantic: SemanticRouter | None = None
        self.generator: Generator | None = None
        self._streamer: DecodeStreamer | None = None
        self._grpc: GrpcServer | None = None
        self._http: HttpServer | None = None
        self._keys = load_keys(config.api_key_file)  # never logged
        self._metrics_port: int | None = None

    @property
    def address(self) -> str:
        if self._grpc is None:
            raise RuntimeError("RouterServer.address is only known after start()")
        return self._grpc.address

    @property
    def http_address(self) -> str | None:
        return self._http.address if self._http is not None else None

    @property
    def metrics_address(self) -> str | None:
        if self._metrics_port is None:
            return None
        return f"{self.config.host}:{self._metrics_port}"

    async def start(self) -> None:
        env.apply_offline_defaults()
        cfg = self.config
        pools = await asyncio.to_thread(self._load_pools)
        if cfg.semantic.routes:
            self.semantic = SemanticRouter(cfg.semantic, MiniLMEmbedder(cfg.semantic.model_path))
            await asyncio.to_thread(self.semantic.prepare)
        await self.view.start()
        await self.follower.start()
        self._streamer = DecodeStreamer(
            self.channels,
            self.tracker,
            on_retry=self._count_retry,
            max_migrations=cfg.max_migrations,
            on_migration=self._count_migration,
            on_migrated=self._time_migration,
            draining=self._draining,
        )
        self.generator = Generator(
            cfg, pools, self.view, self.tracker, self._streamer, self.metrics, self.semantic
        )
        self._grpc = GrpcServer(
            cfg.host,
            cfg.port,
            [
                (
                    serving_pb2_grpc.add_GenerationServicer_to_server,
                    GenerationServicer(self.generator),
                )
            ],
            [SERVICE_NAME],
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ],
            interceptors=[ApiKeyInterceptor(self._keys, [SERVICE_NAME])] if self._keys else [],
            credentials=grpc_server_credentials(cfg),
        )
        await self._grpc.start()
        if cfg.http_port is not None:
            app = build_app(self.generator, self._keys, _MAX_MESSAGE_BYTES)
            self._http = HttpServer(app, cfg.host, cfg.http_port, uvicorn_ssl_options(cfg))
            await self._http.start()
        if cfg.metrics_port is not None:
            self._metrics_port = self.metrics.metrics.start_http(cfg.metrics_port, cfg.host)

    async def stop(self, grace_s: float = 5.0) -> None:
        stopping = [s.stop(grace_s) for s in (self._grpc, self._http) if s is not None]
        await asyncio.gather(*stopping)
        await self.follower.stop()
        await self.view.stop()
        if self._streamer is not None:
            await self._streamer.close()
        if self.semantic is not None:
            self.semantic.close()
        await self.channels.close()
        await self.registry.aclose()
        self.metrics.metrics.stop_http()

    async def wait_for_termination(self) -> None:
        if self._grpc is not None:
            await self._grpc.wait_for_termination()

    def _load_pools(self) -> dict[str, PoolRuntime]:
        tokenizers: dict[str | None, ModelTokenizer] = {}
        pools = {}
        for pool in self.config.pools:
            if pool.model_path not in tokenizers:
                tokenizers[pool.model_path] = ModelTokenizer.load(pool.model_path)
            pools[pool.name] = PoolRuntime(
                pool, tokenizers[pool.model_path], self.indexes[pool.name], make_policy(pool)
            )
        return pools

    def _on_refresh(self, live: frozenset[str]) -> None:
        for name, index in self.indexes.items():
            index.retain(live)
            self.metrics.index_entries.labels(name).set(index.num_entries)
            self.metrics.index_bytes.labels(name).set(index.approx_bytes)
            self.metrics.index_evictions.labels(name).set(index.evicted)
        self.tracker.retain(live)
        addresses = {
            w.info.grpc_address
            for pool in self.config.pools
            for group in (
                self.view.snapshot(pool.name).prefill,
                self.view.snapshot(pool.name).decode,
                self.view.snapshot(pool.name).colocated,
            )
            for w in group
        }
        self.channels.retain(addresses)

    def _count_retry(self, pool: str, reason: str) -> None:
        self.metrics.retries.labels(pool, reason).inc()

    def _count_migration(self, pool: str, cause: str) -> None:
        self.metrics.migrations.labels(pool, cause).inc()

    def _time_migration(self, pool: str, seconds: float) -> None:
        self.metrics.migration_seconds.labels(pool).observe(seconds)

    def _draining(self, pool: str, worker_id: str) -> bool:
        """Whether ``worker_id`` drains or has deregistered (a killed worker stays
        registered until its registration expires)."""
        snapshot = self.view.snapshot(pool)
        live = {w.worker_id for w in (*snapshot.decode, *snapshot.colocated)}
        return worker_id in snapshot.draining or worker_id not in live
