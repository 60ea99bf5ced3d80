"""The decode worker's client of prefill workers: one ``Prefill`` per request.

:class:`PrefillClient` is the interface the request lifecycle (:mod:`decode_worker.decode`)
calls; :class:`GrpcPrefillClient` is the real one (the PrefillWorker RPC, converted by
:mod:`messages.prefill_proto`), :class:`~decode_worker.prefill_fake.FakePrefillClient`
the in-process one of the tests. Either way the answer is a
:class:`~messages.prefill.PrefillResult` once the KV has landed, or :class:`PrefillFailed`.
Cancelling the awaiting coroutine cancels the call, which makes the prefill worker abort
the prefill and its KV send.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import grpc

from common.cluster_secret import ClusterSecret, call_metadata
from messages.prefill import PrefillJob, PrefillResult
from messages.prefill_proto import job_to_proto, result_from_proto
from proto import worker_pb2_grpc


class PrefillFailed(Exception):
    """The prefill worker refused, failed, was unreachable, or did not answer in time."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # short label for metrics: the gRPC status code, lower case


class PrefillClient(Protocol):
    async def prefill(self, address: str, job: PrefillJob) -> PrefillResult:
        """Have the prefill worker at ``address`` (its gRPC host:port) run ``job``, by
        ``job.deadline``; raises :class:`PrefillFailed`."""
        ...

    async def close(self) -> None: ...


class GrpcPrefillClient:
    """Channels are kept per address for the life of the worker."""

    def __init__(self, secret: ClusterSecret | None = None) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._metadata = call_metadata(secret)  # the cluster token, when there is a secret

    async def prefill(self, address: str, job: PrefillJob) -> PrefillResult:
        stub = worker_pb2_grpc.PrefillWorkerStub(self._channel(address))
        timeout = None
        if job.deadline is not None:
            timeout = max(job.deadline - time.monotonic(), 0.001)
        try:
            reply = await stub.Prefill(job_to_proto(job), timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            raise PrefillFailed(
                code.name.lower(), f"{address}: {code.name}: {exc.details()}"
            ) from None
        return result_from_proto(reply, prompt_logprobs=job.params.prompt_logprobs)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(channel.close() for channel in channels))

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        return channel
