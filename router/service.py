"""The public gRPC servicer, ``pdserve.v1.Generation``: the router's front door.

Each request is translated by :mod:`router.api_proto` (the one place the public proto
meets the router's dataclasses), handed to the :class:`~router.generation.Generator`, and
its chunks translated back; a :class:`~common.errors.RequestError` becomes the gRPC status
of the same name (:mod:`messages.grpc_status`, as on every servicer). The client's deadline
is handed down; a cancelled client cancels the handler, which cancels the worker call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import grpc

from common.errors import RequestError
from messages.grpc_status import abort
from proto import serving_pb2, serving_pb2_grpc
from router import api_proto
from router.auth import client_id_of
from router.generation import Generator


class GenerationServicer(serving_pb2_grpc.GenerationServicer):
    def __init__(self, generator: Generator) -> None:
        self._generator = generator

    async def Generate(
        self, request: serving_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[serving_pb2.GenerateResponse]:
        req = api_proto.input_from_proto(request)
        client_id = _client_id(context)
        if client_id:
            req = dataclasses.replace(req, client_id=client_id)
        chunks = self._generator.generate(req, context.time_remaining())
        try:
            async for chunk in chunks:
                yield api_proto.chunk_to_proto(chunk)
        except RequestError as exc:
            await abort(context, exc)  # with a refusal's retry-after-ms
        except Exception as exc:  # a bug: logged by the generator; the client gets INTERNAL
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc!r}")

    async def ListModels(
        self, request: serving_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> serving_pb2.ListModelsResponse:
        return api_proto.models_to_proto(self._generator.list_models())


CLIENT_ID_METADATA = "x-client-id"  # names the caller for fair sharing of the queues


def _client_id(context: grpc.aio.ServicerContext) -> str:
    """``x-client-id`` metadata, else the API key's fingerprint, else "" (anonymous)."""
    metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
    return metadata.get(CLIENT_ID_METADATA) or client_id_of(metadata.get("authorization"))
