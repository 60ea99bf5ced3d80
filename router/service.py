"""The public gRPC servicer, ``pdserve.v1.Generation``: proto ↔ dataclasses, nothing else.

The one place the public proto meets the router: requests become
:class:`~router.request.GenerateInput`, chunks become ``GenerateResponse``, and
:class:`~router.request.RequestError` becomes the gRPC status of the same name. The
client's deadline is handed down; a cancelled client cancels the handler, which cancels
the worker call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from proto import serving_pb2, serving_pb2_grpc
from router.generation import Generator
from router.replies import Chunk
from router.request import ChatMessage, ErrorCode, GenerateInput, RequestError, SamplingSpec
from router.stream import FinishReason

SERVICE_NAME: str = serving_pb2.DESCRIPTOR.services_by_name["Generation"].full_name

_STATUS = {code: getattr(grpc.StatusCode, code.value) for code in ErrorCode}
_FINISH = {
    FinishReason.STOP: serving_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: serving_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: serving_pb2.FINISH_REASON_ABORT,
}


class GenerationServicer(serving_pb2_grpc.GenerationServicer):
    def __init__(self, generator: Generator) -> None:
        self._generator = generator

    async def Generate(
        self, request: serving_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[serving_pb2.GenerateResponse]:
        chunks = self._generator.generate(to_input(request), context.time_remaining())
        try:
            async for chunk in chunks:
                yield to_response(chunk)
        except RequestError as exc:
            await context.abort(_STATUS[exc.code], exc.message)
        except Exception as exc:  # a bug: logged by the generator; the client gets INTERNAL
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc!r}")

    async def ListModels(
        self, request: serving_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> serving_pb2.ListModelsResponse:
        return serving_pb2.ListModelsResponse(
            models=[
                serving_pb2.ModelCard(
                    name=card.name,
                    pool=card.pool,
                    context_length=card.context_length,
                    prefill_workers=card.prefill_workers,
                    decode_workers=card.decode_workers,
                    is_default=card.is_default,
                )
                for card in self._generator.list_models()
            ]
        )


def to_input(request: serving_pb2.GenerateRequest) -> GenerateInput:
    which = request.WhichOneof("input")
    s = request.sampling
    return GenerateInput(
        request_id=request.request_id,
        model=request.model,
        prompt=request.prompt if which == "prompt" else None,
        messages=(
            tuple(ChatMessage(m.role, m.content) for m in request.messages.messages)
            if which == "messages"
            else None
        ),
        token_ids=tuple(request.token_ids.ids) if which == "token_ids" else None,
        sampling=SamplingSpec(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=s.seed if s.HasField("seed") else None,
            stop=tuple(s.stop),
            ignore_eos=s.ignore_eos,
            stop_token_ids=tuple(s.stop_token_ids),
        ),
    )


def to_response(chunk: Chunk) -> serving_pb2.GenerateResponse:
    response = serving_pb2.GenerateResponse(
        request_id=chunk.request_id, text=chunk.text, token_ids=chunk.token_ids
    )
    if chunk.finish_reason is not None:
        response.finish_reason = _FINISH[chunk.finish_reason]
    if chunk.usage is not None:
        u = chunk.usage
        response.usage.CopyFrom(
            serving_pb2.Usage(
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                cached_tokens=u.cached_tokens,
            )
        )
    if chunk.route is not None:
        r = chunk.route
        response.route.CopyFrom(
            serving_pb2.Route(
                pool=r.pool,
                prefill_worker=r.prefill_worker,
                decode_worker=r.decode_worker,
                semantic_route=r.semantic_route,
                policy=r.policy,
                predicted_cached_tokens=r.predicted_cached_tokens,
                attempts=r.attempts,
            )
        )
    return response
