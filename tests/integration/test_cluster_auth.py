"""The inside of the cluster: Redis password, cluster token on worker RPCs, signed
registrations the router trusts, and authenticated KV joins (real Redis, real gRPC, gloo
on loopback; fake workers, no model)."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.cluster_secret import TOKEN_METADATA_KEY, ClusterSecret
from common.grpc_auth import ClusterTokenInterceptor
from common.grpc_server import GrpcServer
from common.kv_events import BlockStored
from common.redis_client import url_with_password
from common.registry import Registry, SyncRegistryReader
from common.worker_info import WorkerRole
from engine.kv_cache import KVCache, KVLayout
from kv_transfer.errors import IncompatiblePeer
from kv_transfer.receiver import TorchDistReceiver
from kv_transfer.rendezvous import connect_store, request_join
from kv_transfer.sender import TorchDistSender
from kv_transfer.types import RecvSpec, SendSpec, TransferConfig, TransferState
from messages.status import WorkerStatus
from proto import worker_pb2, worker_pb2_grpc
from tests.integration.router_fakes import FakeCluster
from tests.integration.router_helpers import (
    generate,
    run_bounded,
    start_router,
    stub,
    wait_workers,
)
from worker.control import CONTROL_SERVICE, ControlServicer

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
pytestmark = pytest.mark.timeout(90)

SECRET = ClusterSecret(b"s" * 32)
OTHER = ClusterSecret(b"o" * 32)  # another cluster's


# ---- Redis password ---------------------------------------------------------------------


def test_registry_needs_the_redis_password(redis_url: str, tmp_path: Path) -> None:
    """The private redis-server requires its generated password: the URL's or a file's
    works, none or a wrong one fails with Redis's authentication error."""
    parts = urlsplit(redis_url)
    assert parts.password, "RedisProcess starts redis-server with a password"
    bare = f"redis://{parts.hostname}:{parts.port}/0"
    password_file = tmp_path / "redis.password"
    password_file.write_text(parts.password + "\n")
    for url, kwargs in ((redis_url, {}), (bare, {"password_file": password_file})):
        reader = SyncRegistryReader(url, "auth-none", **kwargs)
        try:
            assert reader.list_workers() == []
        finally:
            reader.close()
    for url in (bare, url_with_password(bare, "wrong")):
        reader = SyncRegistryReader(url, "auth-none")
        try:
            with pytest.raises(redis.AuthenticationError):
                reader.list_workers()
        finally:
            reader.close()

    async def main() -> None:
        async with Registry(bare, "auth-none", password_file=password_file) as registry:
            assert await registry.list_workers() == []
        async with Registry(bare, "auth-none") as registry:
            with pytest.raises(redis.AuthenticationError):
                await registry.list_workers()

    asyncio.run(main())


# ---- worker RPCs --------------------------------------------------------------------------


def test_worker_rpcs_need_the_cluster_token() -> None:
    status = WorkerStatus("w0", "decode", "default", 0, 0, 0, 0, 0, 0, 0, False)

    async def get_status() -> WorkerStatus:
        return status

    async def main() -> None:
        server = GrpcServer(
            "127.0.0.1",
            0,
            [(worker_pb2_grpc.add_WorkerControlServicer_to_server, ControlServicer(get_status))],
            [CONTROL_SERVICE],
            interceptors=[ClusterTokenInterceptor(SECRET)],
        )
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                control = worker_pb2_grpc.WorkerControlStub(channel)
                for metadata in (None, OTHER.metadata(), ((TOKEN_METADATA_KEY, "guess"),)):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await control.GetStatus(worker_pb2.GetStatusRequest(), metadata=metadata)
                    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
                reply = await control.GetStatus(
                    worker_pb2.GetStatusRequest(), metadata=SECRET.metadata()
                )
                assert reply.worker_id == "w0"
                health = health_pb2_grpc.HealthStub(channel)  # open: probes need no secret
                answer = await health.Check(health_pb2.HealthCheckRequest())
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop(grace_s=0)

    asyncio.run(main())


# ---- registrations ------------------------------------------------------------------------


def test_router_routes_only_to_signed_workers(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Workers registered without the secret, or with another cluster's, are in Redis but
    never in the router's view and never get a request; the member's own port refuses a
    caller without the token, and the router's calls carry it."""
    namespace = f"auth-{uuid.uuid4().hex[:8]}"
    secret_file = SECRET.write(tmp_path / "cluster.secret")

    async def main() -> None:
        members = FakeCluster(redis_url, namespace, secret=SECRET)
        strangers = FakeCluster(redis_url, namespace)
        forgers = FakeCluster(redis_url, namespace, secret=OTHER)
        router = await start_router(redis_url, namespace, cluster_secret_file=str(secret_file))
        try:
            member = await members.add("member", WorkerRole.COLOCATED)
            stranger = await strangers.add("stranger", WorkerRole.COLOCATED)
            forger = await forgers.add("forger", WorkerRole.COLOCATED)
            await wait_workers(router, "default", 1)
            reader = SyncRegistryReader(redis_url, namespace)  # no secret: sees them all
            try:
                assert len(reader.list_workers()) == 3
            finally:
                reader.close()
            async with grpc.aio.insecure_channel(router.address) as channel:
                for i in range(6):
                    responses = await generate(stub(channel), f"hello {i}", max_tokens=4)
                    assert responses[-1].finish_reason
            assert len(member.calls.requests) == 6
            assert not stranger.calls.requests and not forger.calls.requests
            async with grpc.aio.insecure_channel(member.server.address) as channel:
                call = worker_pb2_grpc.DecodeWorkerStub(channel).Decode(
                    worker_pb2.DecodeRequest(request_id="direct")
                )
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    _ = [r async for r in call]
                assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        finally:
            await router.stop(grace_s=0)
            for cluster in (members, strangers, forgers):
                await cluster.close()

    with caplog.at_level(logging.WARNING, logger="common.registry"):
        run_bounded(main(), timeout_s=40)
    ignored = [r.getMessage() for r in caplog.records if "ignoring worker" in r.getMessage()]
    assert any("stranger" in m for m in ignored) and any("forger" in m for m in ignored)
    assert len(ignored) == 2  # logged once per worker, not once per refresh


# ---- KV joins -----------------------------------------------------------------------------

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, num_blocks=8)


def _config(secret_file: Path | None) -> TransferConfig:
    return TransferConfig(
        timeout_s=10.0,
        connect_timeout_s=3.0,
        poll_interval_s=0.01,
        cluster_secret_file=str(secret_file) if secret_file else None,
    )


def test_kv_join_needs_the_cluster_secret(tmp_path: Path) -> None:
    good = SECRET.write(tmp_path / "cluster.secret")
    receiver = TorchDistReceiver(KVCache(LAYOUT), "m", _config(good))
    sender: TorchDistSender | None = None
    try:
        for secret in (None, OTHER):  # refused before any group exists
            store = connect_store(receiver.address, 5)
            with pytest.raises(IncompatiblePeer, match="cluster-secret proof"):
                request_join(store, "stranger", receiver.handshake, receiver.address, 5, secret)
        assert receiver.num_pairs() == 0
        cache = KVCache(LAYOUT)
        cache.tensor.normal_()
        sender = TorchDistSender(cache, "m", _config(good))  # a member joins and sends
        rt = receiver.expect(RecvSpec("t", (3, 4)), lambda t: None)
        st = sender.send(SendSpec("t", receiver.address, (1, 2)), lambda t: None)
        assert st.wait(20) is TransferState.DONE and rt.wait(20) is TransferState.DONE
    finally:
        if sender is not None:
            sender.close()
        receiver.close()


def test_member_refuses_a_receiver_without_the_secret() -> None:
    open_receiver = TorchDistReceiver(KVCache(LAYOUT), "m", _config(None))
    try:
        store = connect_store(open_receiver.address, 5)
        with pytest.raises(IncompatiblePeer, match="did not prove the cluster secret"):
            request_join(store, "member", open_receiver.handshake, open_receiver.address, 5, SECRET)
    finally:
        open_receiver.close()


def test_kv_events_without_the_signature_are_skipped(redis_url: str) -> None:
    namespace = f"auth-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with (
            Registry(redis_url, namespace, secret=SECRET) as member,
            Registry(redis_url, namespace) as stranger,
            Registry(redis_url, namespace, secret=SECRET) as router,
            Registry(redis_url, namespace) as open_reader,
        ):
            await member.publish_kv_events("member", [BlockStored(1, 0, 0)], pool="p")
            # a stranger announcing blocks as itself and as the member
            for worker_id in ("stranger", "member"):
                await stranger.publish_kv_events(worker_id, [BlockStored(2, 0, 1)], pool="p")
            seen = await router.read_kv_events({"p": "0"})
            assert [(r.worker_id, r.event) for r in seen] == [("member", BlockStored(1, 0, 0))]
            assert len(await open_reader.read_kv_events({"p": "0"})) == 3

    asyncio.run(main())
