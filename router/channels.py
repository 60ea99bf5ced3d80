"""gRPC channels to workers, one per address, reused across requests.

A channel is opened on first use and kept while the address belongs to a live worker;
:meth:`ChannelPool.retain` closes a channel once its address has been gone from the registry
for ``linger_s`` (a draining worker deregisters first and finishes its streams after, so
its channel must outlive its registration). :meth:`probe`
asks a worker's health service whether it is SERVING — the router uses it after a failure
to tell a dead worker (quarantine it) from a request that merely failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.cluster_secret import ClusterSecret, call_metadata
from proto import worker_pb2_grpc

log = logging.getLogger(__name__)

_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 2**20),
    ("grpc.max_send_message_length", 64 * 2**20),
    # Detect a dead peer on an idle-looking stream within seconds, not minutes.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
)


class ChannelPool:
    def __init__(self, linger_s: float = 60.0, secret: ClusterSecret | None = None) -> None:
        self._linger_s = linger_s
        # Worker RPCs carry the cluster token: pass as ``metadata=`` (None: open cluster).
        self.metadata = call_metadata(secret)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, worker_pb2_grpc.DecodeWorkerStub] = {}
        self._gone_since: dict[str, float] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=_OPTIONS)
            self._channels[address] = channel
        return channel

    def decode_stub(self, address: str) -> worker_pb2_grpc.DecodeWorkerStub:
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = worker_pb2_grpc.DecodeWorkerStub(self.channel(address))
        return stub

    async def probe(self, address: str, timeout_s: float = 1.0) -> bool:
        """True if ``address`` answers its health check with SERVING in time."""
        stub = health_pb2_grpc.HealthStub(self.channel(address))
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def retain(self, addresses: Iterable[str]) -> None:
        """Close channels whose address no live worker has had for ``linger_s``."""
        keep = set(addresses)
        now = time.monotonic()
        for address in list(self._gone_since):
            if address in keep or address not in self._channels:
                del self._gone_since[address]
        for address in [a for a in self._channels if a not in keep]:
            since = self._gone_since.setdefault(address, now)
            if now - since < self._linger_s:
                continue
            del self._gone_since[address]
            self._stubs.pop(address, None)
            channel = self._channels.pop(address)
            task = asyncio.ensure_future(channel.close(grace=5.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        self._stubs.clear()
        for channel in channels:
            with contextlib.suppress(Exception):
                await channel.close(grace=None)
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task
