"""The ``Decode`` boundary's proto ↔ dataclass conversions (:mod:`messages.decode`).

Used by both ends: the decode worker's servicer (``job_from_proto``, ``delta_to_proto``)
and the router's streamer (``job_to_proto``, ``delta_from_proto``). Sampling parameters
follow :mod:`messages.sampling_proto`; :class:`~common.generation.FinishReason` maps to the
proto enum here, and ``FINISH_REASON_UNSPECIFIED`` means "not finished yet".
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from common.generation import FinishReason, Usage
from common.sampling import SamplingParams
from messages.decode import DecodeJob, PrefillTarget, TokenDelta
from messages.logprobs_proto import logprobs_from_proto, logprobs_to_proto
from messages.sampling_proto import sampling_from_proto, sampling_to_proto
from proto import worker_pb2

_TO_PROTO = {
    FinishReason.STOP: worker_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: worker_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: worker_pb2.FINISH_REASON_ABORT,
}
_FROM_PROTO = {wire: reason for reason, wire in _TO_PROTO.items()}


def job_to_proto(job: DecodeJob) -> worker_pb2.DecodeRequest:
    """The request; ``job.deadline`` travels as the call's gRPC timeout, not in it."""
    message = worker_pb2.DecodeRequest(
        request_id=job.request_id,
        token_ids=job.prompt,
        sampling=sampling_to_proto(job.params),
        priority=job.priority,
        client_id=job.client_id,
    )
    if job.prefill is not None:
        message.prefill.worker_id = job.prefill.worker_id
        message.prefill.grpc_address = job.prefill.grpc_address
    return message


def job_from_proto(request: worker_pb2.DecodeRequest, time_remaining: float | None) -> DecodeJob:
    """ValueError on invalid sampling. An empty request id gets a fresh one; a prefill
    target without an address means "prefill here"; ``time_remaining`` (the call's, in
    seconds; None: no deadline) becomes the job's deadline."""
    prefill = None
    if request.HasField("prefill") and request.prefill.grpc_address:
        prefill = PrefillTarget(request.prefill.worker_id, request.prefill.grpc_address)
    deadline = None if time_remaining is None else time.monotonic() + time_remaining
    return DecodeJob(
        request_id=request.request_id or uuid.uuid4().hex,
        prompt=tuple(request.token_ids),
        params=sampling_from_proto(request.sampling),
        prefill=prefill,
        deadline=deadline,
        priority=request.priority,
        client_id=request.client_id,
    )


def delta_to_proto(delta: TokenDelta) -> worker_pb2.DecodeResponse:
    message: dict[str, Any] = {"token_ids": delta.token_ids, "prefilled_by": delta.prefilled_by}
    if delta.finish_reason is not None:
        message["finish_reason"] = _TO_PROTO[delta.finish_reason]
    if delta.usage is not None:
        message["usage"] = usage_to_proto(delta.usage)
    message["logprobs"] = logprobs_to_proto(delta.logprobs, worker_pb2.TokenLogprob)
    message["prompt_logprobs"] = logprobs_to_proto(delta.prompt_logprobs, worker_pb2.TokenLogprob)
    return worker_pb2.DecodeResponse(**message)


def delta_from_proto(
    response: worker_pb2.DecodeResponse, params: SamplingParams | None = None
) -> TokenDelta:
    """``params``: the request's, so that asked-for log-probs come back as tuples (maybe
    empty) and unasked ones as None; without them, None stands for "none on the wire"."""
    usage = usage_from_proto(response.usage) if response.HasField("usage") else None
    logprobs = logprobs_from_proto(response.logprobs)
    prompt = logprobs_from_proto(response.prompt_logprobs)
    asked_tokens = params.logprobs is not None if params is not None else bool(logprobs)
    asked_prompt = params.prompt_logprobs if params is not None else bool(prompt)
    return TokenDelta(
        token_ids=tuple(response.token_ids),
        finish_reason=_FROM_PROTO.get(response.finish_reason),
        usage=usage,
        prefilled_by=response.prefilled_by,
        logprobs=logprobs if asked_tokens else None,
        prompt_logprobs=prompt if asked_prompt else None,
    )


def usage_to_proto(usage: Usage) -> worker_pb2.Usage:
    return worker_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
    )


def usage_from_proto(message: worker_pb2.Usage) -> Usage:
    return Usage(message.prompt_tokens, message.completion_tokens, message.cached_tokens)
