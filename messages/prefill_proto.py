"""The ``Prefill`` boundary's proto ↔ dataclass conversions (:mod:`messages.prefill`).

Used by both ends: the decode worker's prefill client (``job_to_proto``,
``result_from_proto``) and the prefill worker's servicer (``job_from_proto``,
``result_to_proto``). Sampling parameters follow :mod:`messages.sampling_proto`, with a
default of one token: the prefill worker samples the first token only.
"""

from __future__ import annotations

import time

from messages.logprobs_proto import (
    logprob_from_proto,
    logprob_to_proto,
    logprobs_from_proto,
    logprobs_to_proto,
)
from messages.prefill import PrefillJob, PrefillResult
from messages.sampling_proto import sampling_from_proto, sampling_to_proto
from proto import worker_pb2

FIRST_TOKEN_ONLY = 1  # what a Prefill generates, whatever max_tokens says


def job_to_proto(job: PrefillJob) -> worker_pb2.PrefillRequest:
    """The request; ``job.deadline`` travels as the call's gRPC timeout, not in it."""
    return worker_pb2.PrefillRequest(
        request_id=job.request_id,
        token_ids=job.prompt,
        sampling=sampling_to_proto(job.params),
        transfer_id=job.transfer_id,
        kv_address=job.kv_address,
        num_blocks=job.num_blocks,
        layer_wise=job.layer_wise,
        priority=job.priority,
        client_id=job.client_id,
    )


def job_from_proto(request: worker_pb2.PrefillRequest, time_remaining: float | None) -> PrefillJob:
    """ValueError on invalid sampling; ``time_remaining`` (the call's, in seconds; None: no
    deadline) becomes the job's deadline."""
    return PrefillJob(
        request_id=request.request_id,
        prompt=tuple(request.token_ids),
        params=sampling_from_proto(request.sampling, default_max_tokens=FIRST_TOKEN_ONLY),
        transfer_id=request.transfer_id,
        kv_address=request.kv_address,
        num_blocks=request.num_blocks,
        layer_wise=request.layer_wise,
        deadline=None if time_remaining is None else time.monotonic() + time_remaining,
        priority=request.priority,
        client_id=request.client_id,
    )


def result_to_proto(result: PrefillResult) -> worker_pb2.PrefillResponse:
    """Log-probs travel only when the request asked (``prompt_logprobs`` None: absent)."""
    message = worker_pb2.PrefillResponse(
        first_token=result.first_token,
        cached_tokens=result.cached_tokens,
        prompt_tokens=result.prompt_tokens,
        kv_bytes=result.kv_bytes,
        transfer_seconds=result.transfer_seconds,
        prompt_logprobs=logprobs_to_proto(result.prompt_logprobs, worker_pb2.TokenLogprob),
    )
    if result.first_logprob is not None:
        message.first_logprob.CopyFrom(
            logprob_to_proto(result.first_logprob, worker_pb2.TokenLogprob)
        )
    return message


def result_from_proto(
    reply: worker_pb2.PrefillResponse, prompt_logprobs: bool = False
) -> PrefillResult:
    """``prompt_logprobs``: the request asked for them (an empty list then is still a list:
    a one-token prompt has none)."""
    first = logprob_from_proto(reply.first_logprob) if reply.HasField("first_logprob") else None
    return PrefillResult(
        first_token=reply.first_token,
        cached_tokens=reply.cached_tokens,
        prompt_tokens=reply.prompt_tokens,
        kv_bytes=int(reply.kv_bytes),
        transfer_seconds=reply.transfer_seconds,
        first_logprob=first,
        prompt_logprobs=logprobs_from_proto(reply.prompt_logprobs) if prompt_logprobs else None,
    )
