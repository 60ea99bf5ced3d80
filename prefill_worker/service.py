"""The PrefillWorker gRPC servicer: proto ↔ dataclass translation and status codes, only.

Translation is :mod:`messages.prefill_proto` (shared with the decode worker's client); the
request's stages live in :mod:`prefill_worker.prefill`. Failures come back as
:class:`~common.errors.RequestError` and leave as the gRPC status of the same name. A
cancelled call (the decode worker gave up, or died) cancels the handler, which aborts the
prefill and its KV send.
"""

from __future__ import annotations

import grpc

from common.errors import RequestError
from engine.async_engine import EngineStopped
from messages.grpc_status import abort
from messages.prefill_proto import job_from_proto, result_to_proto
from prefill_worker.prefill import Prefiller
from proto import worker_pb2, worker_pb2_grpc

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, prefiller: Prefiller) -> None:
        self._prefiller = prefiller

    async def Prefill(  # gRPC method name
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        try:
            job = job_from_proto(request, context.time_remaining())
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            result = await self._prefiller.run(job)
        except RequestError as exc:
            await abort(context, exc)  # with a refusal's retry-after-ms
        except EngineStopped as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine stopped: {exc}")
        return result_to_proto(result)
