"""GrpcServer: health, reflection and graceful shutdown on a real loopback server."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.grpc_server import HEALTH_SERVICE_NAME, GrpcServer, wait_healthy

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def check(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return reply.status


async def list_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for reply in stub.ServerReflectionInfo(iter([request]), timeout=2):
        return sorted(s.name for s in reply.list_services_response.service)
    raise AssertionError("no reflection reply")


def test_health_and_reflection() -> None:
    async def scenario() -> None:
        # Health doubles as the "user" service: it is the one proto every install has.
        server = GrpcServer("127.0.0.1", 0, [], [HEALTH_SERVICE_NAME])
        await server.start()
        try:
            assert server.port > 0
            assert server.address == f"127.0.0.1:{server.port}"
            await asyncio.to_thread(wait_healthy, server.address, 5.0)
            async with grpc.aio.insecure_channel(server.address) as channel:
                assert await check(channel) == SERVING
                assert await check(channel, HEALTH_SERVICE_NAME) == SERVING
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await check(channel, "pdserve.v1.Nope")
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                assert await list_services(channel) == [
                    "grpc.health.v1.Health",
                    "grpc.reflection.v1alpha.ServerReflection",
                ]
                assert not await server.wait_for_termination(timeout_s=0.01)  # still up
                await server.set_serving("", False)  # e.g. draining
                assert await check(channel) == NOT_SERVING
        finally:
            await server.stop(grace_s=0)

    asyncio.run(scenario())


def test_stop_reports_not_serving_during_grace_then_stops() -> None:
    grace_s = 0.5

    async def scenario() -> None:
        server = GrpcServer("127.0.0.1", 0, [], [HEALTH_SERVICE_NAME])
        await server.start()
        async with grpc.aio.insecure_channel(server.address) as channel:
            # A Watch stream stays open across stop(): it is an in-flight call, so it sees
            # the NOT_SERVING transition while the grace period runs.
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="")
            )
            assert (await watch.read()).status == SERVING
            started = time.monotonic()
            stopping = asyncio.create_task(server.stop(grace_s=grace_s))
            assert (await asyncio.wait_for(watch.read(), timeout=2)).status == NOT_SERVING
            assert not stopping.done()  # still within the grace period
            await stopping
            elapsed = time.monotonic() - started
            assert elapsed < grace_s + 1.0
            assert await server.wait_for_termination(timeout_s=1)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await check(channel)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


def test_port_conflict_fails_loudly() -> None:
    async def scenario() -> None:
        first = GrpcServer("127.0.0.1", 0, [], [])
        await first.start()
        try:
            second = GrpcServer("127.0.0.1", first.port, [], [])
            with pytest.raises(OSError, match="could not bind"):
                await second.start()
        finally:
            await first.stop(grace_s=0)

    asyncio.run(scenario())


def test_wait_healthy_times_out_without_server() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="not SERVING"):
        wait_healthy("127.0.0.1:1", timeout_s=0.3)
    assert time.monotonic() - started < 2
