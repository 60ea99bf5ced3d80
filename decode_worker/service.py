"""The DecodeWorker gRPC servicer: proto ↔ dataclass translation and status codes, only.

Translation is :mod:`messages.decode_proto` (shared with the router's streamer);
everything a request goes through lives in :mod:`decode_worker.decode`. Failures come
back as :class:`~common.errors.RequestError` and leave as the gRPC status of the same
name; a client's cancellation or deadline cancels the handler, which unwinds the
request's stages and frees its blocks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from common.errors import RequestError
from decode_worker.decode import Decoder
from engine.async_engine import EngineStopped
from messages.decode_proto import delta_to_proto, job_from_proto
from messages.grpc_status import abort
from proto import worker_pb2, worker_pb2_grpc

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].full_name


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, decoder: Decoder) -> None:
        self._decoder = decoder

    async def Decode(  # gRPC method name
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        try:
            job = job_from_proto(request, context.time_remaining())
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            async for delta in self._decoder.run(job):
                yield delta_to_proto(delta)
        except RequestError as exc:
            await abort(context, exc)  # with a refusal's retry-after-ms
        except EngineStopped as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine stopped: {exc}")
