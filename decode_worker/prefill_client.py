"""The decode worker's client of prefill workers: one ``Prefill`` RPC per request.

This is the decode side's translation point for the PrefillWorker API (dataclasses in,
proto on the wire, a dataclass or :class:`PrefillFailed` out). Channels are kept per
address for the life of the worker. Cancelling the awaiting coroutine cancels the RPC,
which makes the prefill worker abort the prefill and its KV send.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from common.sampling import SamplingParams
from proto import worker_pb2, worker_pb2_grpc


@dataclass(frozen=True, slots=True)
class PrefillCall:
    """What the decode worker asks of a prefill worker for one request."""

    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams  # samples the first token
    transfer_id: str  # the RecvSpec the decode worker registered
    kv_address: str  # the decode worker's KV receiver
    num_blocks: int  # reserved destination blocks
    layer_wise: bool


@dataclass(frozen=True, slots=True)
class PrefillOutcome:
    first_token: int
    cached_tokens: int  # prompt tokens the prefill worker served from its prefix cache
    kv_bytes: float
    transfer_seconds: float


class PrefillFailed(Exception):
    """The prefill worker refused, failed, was unreachable, or did not answer in time."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # short label for metrics: the gRPC status code, lower case


class PrefillClient:
    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def prefill(self, address: str, call: PrefillCall, timeout_s: float) -> PrefillOutcome:
        stub = worker_pb2_grpc.PrefillWorkerStub(self._channel(address))
        request = worker_pb2.PrefillRequest(
            request_id=call.request_id,
            token_ids=call.prompt,
            sampling=sampling_to_proto(call.params),
            transfer_id=call.transfer_id,
            kv_address=call.kv_address,
            num_blocks=call.num_blocks,
            layer_wise=call.layer_wise,
        )
        try:
            reply = await stub.Prefill(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            raise PrefillFailed(
                code.name.lower(), f"{address}: {code.name}: {exc.details()}"
            ) from None
        return PrefillOutcome(
            first_token=reply.first_token,
            cached_tokens=reply.cached_tokens,
            kv_bytes=reply.kv_bytes,
            transfer_seconds=reply.transfer_seconds,
        )

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(channel.close() for channel in channels))

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        return channel


def sampling_to_proto(params: SamplingParams) -> worker_pb2.SamplingParams:
    return worker_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=params.seed,
        stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos,
    )
