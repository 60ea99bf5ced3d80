"""The public gRPC servicer, ``pdserve.v1.Generation``: the router's front door.

Each request is translated by :mod:`router.api_proto` (the one place the public proto
meets the router's dataclasses), handed to the :class:`~router.generation.Generator`, and
its chunks translated back; a :class:`~common.errors.RequestError` becomes the gRPC status
of the same name (:mod:`messages.grpc_status`, as on every servicer). The client's deadline
is handed down; a cancelled client cancels the handler, which cancels the worker call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from common.errors import RequestError
from messages.grpc_status import status_code
from proto import serving_pb2, serving_pb2_grpc
from router import api_proto
from router.generation import Generator


class GenerationServicer(serving_pb2_grpc.GenerationServicer):
    def __init__(self, generator: Generator) -> None:
        self._generator = generator

    async def Generate(
        self, request: serving_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[serving_pb2.GenerateResponse]:
        req = api_proto.input_from_proto(request)
        chunks = self._generator.generate(req, context.time_remaining())
        try:
            async for chunk in chunks:
                yield api_proto.chunk_to_proto(chunk)
        except RequestError as exc:
            await context.abort(status_code(exc.code), exc.message)
        except Exception as exc:  # a bug: logged by the generator; the client gets INTERNAL
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc!r}")

    async def ListModels(
        self, request: serving_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> serving_pb2.ListModelsResponse:
        return api_proto.models_to_proto(self._generator.list_models())
