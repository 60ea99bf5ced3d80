"""In-process fake workers for router tests: real gRPC servers, real Redis registrations.

A :class:`FakeWorker` registers a ``WorkerInfo`` and heartbeats a ``WorkerLoad`` in the real
Redis, exactly as a real worker does, and (for decode / colocated roles) serves
``DecodeWorker.Decode`` by streaming a scripted reply; every worker serves gRPC health, so
the router's probes work. Fake prefill workers compute nothing: when a fake decode worker
gets a request naming one, it publishes that prompt's ``BlockStored`` events as that prefill
worker, which is what a real prefill worker's cache would announce.

``kill()`` simulates a crash (server gone, heartbeat stops, registration left to expire);
``stop()`` is a clean exit (deregisters).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from common.cluster_secret import ClusterSecret
from common.grpc_auth import ClusterTokenInterceptor
from common.grpc_server import GrpcServer
from common.hashing import ROOT_HASH, block_hashes
from common.kv_events import BlockStored
from common.registry import Registry
from common.worker_info import BlockGeometry, WorkerInfo, WorkerLoad, WorkerRole
from proto import worker_pb2, worker_pb2_grpc
from router.tasks import cancel_and_wait

BLOCK_SIZE = 16
MODEL = "SmolLM2-135M-Instruct"


@dataclass
class Script:
    """What a fake decode worker does with one request."""

    tokens: list[int]
    per_message: int = 1
    delay_s: float = 0.0  # before each message
    fail_before: grpc.StatusCode | None = None  # fail with this before any token
    fail_after: int | None = None  # fail with UNAVAILABLE once this many tokens were sent
    lose_finish: bool = False  # send every token, then fail UNAVAILABLE instead of finishing
    finish: int = worker_pb2.FINISH_REASON_LENGTH
    cached_tokens: int = 0


@dataclass
class Calls:
    requests: list[worker_pb2.DecodeRequest] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)


class FakeDecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(
        self,
        worker_id: str,
        script: Callable[[worker_pb2.DecodeRequest], Script],
        cluster: FakeCluster,
    ) -> None:
        self.worker_id = worker_id
        self.script = script
        self.cluster = cluster
        self.calls = Calls()

    async def Decode(self, request, context):
        self.calls.requests.append(request)
        script = self.script(request)
        try:
            if script.fail_before is not None:
                await context.abort(script.fail_before, f"{self.worker_id} says no")
            prefilled_by = request.prefill.worker_id or "local"
            await self.cluster.prefilled(prefilled_by, list(request.token_ids))
            tokens = script.tokens[: request.sampling.max_tokens]
            finish = script.finish if len(tokens) == len(script.tokens) else None
            for i in range(0, len(tokens), script.per_message):
                if script.fail_after is not None and i >= script.fail_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.worker_id} broke")
                await asyncio.sleep(script.delay_s)
                response = worker_pb2.DecodeResponse(
                    token_ids=tokens[i : i + script.per_message],
                    prefilled_by=prefilled_by if i == 0 else "",
                )
                if i + script.per_message >= len(tokens) and script.lose_finish:
                    yield response
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.worker_id} broke")
                if i + script.per_message >= len(tokens):
                    response.finish_reason = finish or worker_pb2.FINISH_REASON_LENGTH
                    response.usage.CopyFrom(
                        worker_pb2.Usage(
                            prompt_tokens=len(request.token_ids),
                            completion_tokens=len(tokens),
                            cached_tokens=script.cached_tokens,
                        )
                    )
                yield response
            self.calls.completed.append(request.request_id)
        except asyncio.CancelledError:
            self.calls.cancelled.append(request.request_id)
            raise


class FakeWorker:
    def __init__(
        self,
        cluster: FakeCluster,
        worker_id: str,
        role: WorkerRole,
        pool: str,
        script: Callable[[worker_pb2.DecodeRequest], Script] | None = None,
        load: WorkerLoad | None = None,
        num_blocks: int = 1000,
    ) -> None:
        self.cluster = cluster
        self.worker_id = worker_id
        self.role = role
        self.pool = pool
        self.load = load or WorkerLoad(worker_id, 0, 0, num_blocks, 0, 0)
        self.num_blocks = num_blocks
        self.servicer: FakeDecodeServicer | None = None
        services = []
        if role is not WorkerRole.PREFILL:
            self.servicer = FakeDecodeServicer(worker_id, script or default_script, cluster)
            services.append((worker_pb2_grpc.add_DecodeWorkerServicer_to_server, self.servicer))
        secret = cluster.secret  # as a real worker: RPCs need the cluster token
        self.server = GrpcServer(
            "127.0.0.1",
            0,
            services,
            ["pdserve.worker.v1.DecodeWorker"],
            interceptors=[ClusterTokenInterceptor(secret)] if secret is not None else [],
        )
        self._beat: asyncio.Task[None] | None = None

    @property
    def calls(self) -> Calls:
        assert self.servicer is not None
        return self.servicer.calls

    @property
    def info(self) -> WorkerInfo:
        geometry = BlockGeometry(MODEL, "float32", BLOCK_SIZE, 30, 3, 64, self.num_blocks)
        return WorkerInfo(
            self.worker_id, self.role, self.pool, MODEL, self.server.address, None, geometry
        )

    async def start(self) -> None:
        await self.server.start()
        await self.cluster.registry.register(self.info)
        await self.cluster.registry.publish_load(self.load)
        self._beat = asyncio.create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            with contextlib.suppress(Exception):
                if not await self.cluster.registry.heartbeat(self.worker_id, self.load):
                    await self.cluster.registry.register(self.info, clear_kv=False)

    async def publish_prompt(self, token_ids: list[int]) -> None:
        """Announce the prompt's full blocks as cached here (what a prefill would do)."""
        hashes = block_hashes(token_ids, BLOCK_SIZE)
        parents = [ROOT_HASH, *hashes][: len(hashes)]
        events = [
            BlockStored(h, p, i) for i, (h, p) in enumerate(zip(hashes, parents, strict=True))
        ]
        await self.cluster.registry.publish_kv_events(self.worker_id, events, pool=self.pool)

    async def kill(self) -> None:
        """Crash: no deregistration, the registration expires by TTL."""
        await self._stop_beat()
        await self.server.stop(grace_s=0)

    async def stop(self) -> None:
        await self._stop_beat()
        await self.cluster.registry.deregister(self.worker_id)
        await self.server.stop(grace_s=0)

    async def _stop_beat(self) -> None:
        await cancel_and_wait(self._beat)
        self._beat = None


def default_script(request: worker_pb2.DecodeRequest) -> Script:
    return Script(tokens=[100 + i for i in range(8)])


class FakeCluster:
    """Fake workers sharing one Registry client (TTL 1 s, so crashes show up quickly).

    With ``secret`` they sign their registrations and require the cluster token."""

    def __init__(
        self,
        redis_url: str,
        namespace: str,
        ttl_s: float = 1.0,
        secret: ClusterSecret | None = None,
    ) -> None:
        self.secret = secret
        self.registry = Registry(redis_url, namespace, heartbeat_ttl_s=ttl_s, secret=secret)
        self.workers: dict[str, FakeWorker] = {}
        self._ids = itertools.count()

    async def add(
        self,
        worker_id: str,
        role: WorkerRole,
        pool: str = "default",
        script: Callable[[worker_pb2.DecodeRequest], Script] | None = None,
        **kwargs: object,
    ) -> FakeWorker:
        worker = FakeWorker(self, worker_id, role, pool, script, **kwargs)  # type: ignore[arg-type]
        await worker.start()
        self.workers[worker_id] = worker
        return worker

    async def prefilled(self, worker_id: str, token_ids: list[int]) -> None:
        worker = self.workers.get(worker_id)
        if worker is not None and worker.role is not WorkerRole.DECODE:
            await worker.publish_prompt(token_ids)

    async def close(self) -> None:
        for worker in self.workers.values():
            with contextlib.suppress(Exception):
                await worker.stop()
        await self.registry.aclose()
