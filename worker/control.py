"""The ``WorkerControl`` gRPC servicer every worker serves: ``GetStatus``.

Translation only (:mod:`messages.status_proto`); the status itself comes from the
runtime, as a function handed in at construction."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from messages.status import WorkerStatus
from messages.status_proto import status_to_proto
from proto import worker_pb2, worker_pb2_grpc

CONTROL_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerControl"].full_name


class ControlServicer(worker_pb2_grpc.WorkerControlServicer):
    def __init__(self, status: Callable[[], Awaitable[WorkerStatus]]) -> None:
        self._status = status

    async def GetStatus(  # gRPC method name
        self, request: worker_pb2.GetStatusRequest, context: Any
    ) -> worker_pb2.WorkerStatus:
        return status_to_proto(await self._status())
