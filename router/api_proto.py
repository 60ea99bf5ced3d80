"""The public boundary's one conversion module: ``serving_pb2`` ↔ :mod:`router.api`.

Both sides of ``pdserve.v1.Generation`` translate here and nowhere else, so the two
directions cannot drift apart::

    client (router.client)                      servicer (router.service)
    input_to_proto(GenerateInput)   ──────→     input_from_proto(GenerateRequest)
    chunk_from_proto(response)      ←──────     chunk_to_proto(Chunk)
    list_models_request()           ──────→
    models_from_proto(response)     ←──────     models_to_proto([ModelCard])

The rules (``proto/serving.proto`` documents the fields): the ``input`` oneof maps to
whichever of ``prompt`` / ``messages`` / ``token_ids`` is set (an empty list is still set);
``seed`` is optional (absent = None); ``FINISH_REASON_UNSPECIFIED`` (every chunk but the
last) is None; ``usage`` and ``route`` are None when absent. A failed request's status is
:func:`messages.grpc_status.status_code` of its :class:`~common.errors.ErrorCode`, the same
for every servicer.
"""

from __future__ import annotations

from collections.abc import Iterable

from common.generation import FinishReason, Usage
from messages.logprobs_proto import logprobs_from_proto, logprobs_to_proto
from proto import serving_pb2
from router.api import ChatMessage, Chunk, GenerateInput, ModelCard, RouteInfo, SamplingSpec

SERVICE_NAME: str = serving_pb2.DESCRIPTOR.services_by_name["Generation"].full_name

_FINISH_TO_PROTO = {
    FinishReason.STOP: serving_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: serving_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: serving_pb2.FINISH_REASON_ABORT,
}
_FINISH_FROM_PROTO = {value: reason for reason, value in _FINISH_TO_PROTO.items()}


# ---- GenerateRequest -------------------------------------------------------------------------


def input_to_proto(req: GenerateInput) -> serving_pb2.GenerateRequest:
    s = req.sampling
    sampling = serving_pb2.SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        stop=list(s.stop),
        ignore_eos=s.ignore_eos,
        stop_token_ids=list(s.stop_token_ids),
    )
    if s.seed is not None:
        sampling.seed = s.seed
    if s.logprobs is not None:
        sampling.logprobs = s.logprobs
    if s.speculative is not None:
        sampling.speculative = s.speculative
    sampling.prompt_logprobs = s.prompt_logprobs
    request = serving_pb2.GenerateRequest(
        request_id=req.request_id, model=req.model, sampling=sampling, priority=req.priority
    )
    if req.prompt is not None:
        request.prompt = req.prompt
    elif req.messages is not None:
        request.messages.SetInParent()
        request.messages.messages.extend(
            serving_pb2.ChatMessage(role=m.role, content=m.content) for m in req.messages
        )
    elif req.token_ids is not None:
        request.token_ids.SetInParent()
        request.token_ids.ids.extend(req.token_ids)
    return request


def input_from_proto(request: serving_pb2.GenerateRequest) -> GenerateInput:
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
            logprobs=s.logprobs if s.HasField("logprobs") else None,
            prompt_logprobs=s.prompt_logprobs,
            speculative=s.speculative if s.HasField("speculative") else None,
        ),
        priority=request.priority,
    )


# ---- GenerateResponse ------------------------------------------------------------------------


def chunk_to_proto(chunk: Chunk) -> serving_pb2.GenerateResponse:
    response = serving_pb2.GenerateResponse(
        request_id=chunk.request_id,
        text=chunk.text,
        token_ids=chunk.token_ids,
        logprobs=logprobs_to_proto(chunk.logprobs, serving_pb2.TokenLogprob),
        prompt_logprobs=logprobs_to_proto(chunk.prompt_logprobs, serving_pb2.TokenLogprob),
    )
    if chunk.finish_reason is not None:
        response.finish_reason = _FINISH_TO_PROTO[chunk.finish_reason]
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
                prefill_mode=r.prefill_mode,
            )
        )
    return response


def chunk_from_proto(response: serving_pb2.GenerateResponse) -> Chunk:
    """The chunk a response carries; an unknown finish reason (a newer server) reads as None."""
    usage = route = None
    if response.HasField("usage"):
        u = response.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
    if response.HasField("route"):
        r = response.route
        route = RouteInfo(
            pool=r.pool,
            prefill_worker=r.prefill_worker,
            decode_worker=r.decode_worker,
            semantic_route=r.semantic_route,
            policy=r.policy,
            predicted_cached_tokens=r.predicted_cached_tokens,
            attempts=r.attempts,
            prefill_mode=r.prefill_mode,
        )
    return Chunk(
        request_id=response.request_id,
        text=response.text,
        token_ids=tuple(response.token_ids),
        finish_reason=_FINISH_FROM_PROTO.get(response.finish_reason),
        usage=usage,
        route=route,
        logprobs=logprobs_from_proto(response.logprobs) or None,
        prompt_logprobs=logprobs_from_proto(response.prompt_logprobs) or None,
    )


# ---- ListModels ------------------------------------------------------------------------------


def list_models_request() -> serving_pb2.ListModelsRequest:
    return serving_pb2.ListModelsRequest()


def models_to_proto(cards: Iterable[ModelCard]) -> serving_pb2.ListModelsResponse:
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
            for card in cards
        ]
    )


def models_from_proto(response: serving_pb2.ListModelsResponse) -> list[ModelCard]:
    return [
        ModelCard(
            name=m.name,
            pool=m.pool,
            context_length=m.context_length,
            prefill_workers=m.prefill_workers,
            decode_workers=m.decode_workers,
            is_default=m.is_default,
        )
        for m in response.models
    ]
