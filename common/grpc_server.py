"""A grpc.aio server with health checking, reflection and graceful shutdown.

Every pdserve process that serves gRPC (router, prefill, decode workers) runs one of these
so that ``grpcurl`` and health probes work the same everywhere.

Lifecycle::

    server = GrpcServer("127.0.0.1", 0, [(add_FooServicer_to_server, FooServicer())],
                        ["pdserve.v1.Foo"])
    await server.start()          # bound; health "" and each service SERVING
    ...                           # server.port / server.address are valid now
    await server.stop(grace_s=5)  # health NOT_SERVING, optional drain, then stop(grace)

Health (``grpc.health.v1.Health``) reports the overall status under ``""`` and one status
per named service. ``stop`` flips them all to NOT_SERVING *before* refusing new calls, so
Watch streams and pollers see the worker leave while in-flight calls finish within the
grace period. Reflection lists the named services plus health and reflection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

AddServicerFn = Callable[[Any, grpc.aio.Server], None]

HEALTH_SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcServer:
    """One grpc.aio server: the given servicers plus health and reflection."""

    def __init__(
        self,
        host: str,
        port: int,
        services: Sequence[tuple[AddServicerFn, Any]],
        service_names: Sequence[str],
        *,
        options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self._host = host
        self._requested_port = port
        self._services = list(services)
        self._service_names = list(service_names)
        # SO_REUSEPORT is on by default in grpc: a second server on a taken port would
        # silently share it instead of failing. pdserve wants the failure.
        self._options = [("grpc.so_reuseport", 0), *options]
        self._credentials = credentials  # None: plaintext; else e.g. ssl_server_credentials
        self._interceptors = list(interceptors)  # e.g. common.grpc_auth on worker servers
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("GrpcServer.port is only known after start()")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` to dial; IPv6 hosts are bracketed."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("GrpcServer already started")
        server = grpc.aio.server(options=self._options, interceptors=self._interceptors)
        for add_fn, servicer in self._services:
            add_fn(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [*self._service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(list(dict.fromkeys(names)), server)
        target = f"[{self._host}]" if ":" in self._host else self._host
        target = f"{target}:{self._requested_port}"
        try:
            if self._credentials is None:
                port = server.add_insecure_port(target)
            else:
                port = server.add_secure_port(target, self._credentials)
        except RuntimeError as exc:  # grpc's only signal for a failed bind
            raise OSError(f"could not bind gRPC server to {target}: {exc}") from exc
        for name in ["", *self._service_names]:
            await self.health.set(name, _SERVING)
        await server.start()
        self._server, self._port = server, port

    async def set_serving(self, service: str, serving: bool) -> None:
        """Change one service's health (``""`` = overall), e.g. while draining."""
        await self.health.set(service, _SERVING if serving else _NOT_SERVING)

    async def stop(self, grace_s: float | None = 5.0, drain_s: float = 0.0) -> None:
        """NOT_SERVING everywhere, wait ``drain_s`` for pollers to notice, then stop.

        In-flight calls get ``grace_s`` to finish (None = wait for all of them); new calls
        are refused from the moment ``server.stop`` starts.
        """
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        if drain_s > 0:
            await asyncio.sleep(drain_s)
        await self._server.stop(grace_s)

    async def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        """Wait until the server stops: True once stopped, False if ``timeout_s`` passed."""
        if self._server is None:
            raise RuntimeError("GrpcServer was not started")
        # grpc returns whether the wait *timed out*; invert so True reads as "terminated".
        timed_out = await self._server.wait_for_termination(timeout_s)
        return not timed_out


def wait_healthy(
    address: str,
    timeout_s: float = 10.0,
    service: str = "",
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Block until ``address`` reports ``service`` SERVING; TimeoutError otherwise.

    For tests and CLIs that start a server in another process (``credentials``: a TLS
    server's; None = plaintext).
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    if credentials is None:
        opened = grpc.insecure_channel(address)
    else:
        opened = grpc.secure_channel(address, credentials)
    with opened as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{address} not SERVING after {timeout_s}s (last: {last})")
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=min(remaining, 1.0)
                )
                if reply.status == _SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
