"""The DecodeWorker gRPC servicer: proto ↔ dataclass translation and status codes, only.

Everything a request goes through lives in :mod:`decode_worker.decode`. Failures come
back as :class:`~common.worker_runtime.RequestError` and leave as the gRPC status of the
same name; a client's cancellation or deadline cancels the handler, which unwinds the
request's stages and frees its blocks.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from common.sampling import SamplingParams
from common.worker_runtime import ErrorKind, RequestError
from decode_worker.decode import Decoder
from decode_worker.job import DecodeJob, PrefillTarget, TokenDelta
from engine.async_engine import EngineStopped
from engine.sequence import FinishReason
from proto import worker_pb2, worker_pb2_grpc

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].full_name

_FINISH = {
    FinishReason.STOP: worker_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: worker_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: worker_pb2.FINISH_REASON_ABORT,
}


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
            await context.abort(status_code(exc.kind), str(exc))
        except EngineStopped as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine stopped: {exc}")


def status_code(kind: ErrorKind) -> grpc.StatusCode:
    return grpc.StatusCode[kind.name]


def job_from_proto(request: worker_pb2.DecodeRequest, time_remaining: float | None) -> DecodeJob:
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
    )


def sampling_from_proto(sampling: worker_pb2.SamplingParams) -> SamplingParams:
    """ValueError on invalid values; proto3 zero defaults mean "unset" where noted."""
    return SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p or 1.0,  # 0 is the proto default: unset
        top_k=sampling.top_k,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop_token_ids=tuple(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
    )


def delta_to_proto(delta: TokenDelta) -> worker_pb2.DecodeResponse:
    message: dict[str, Any] = {"token_ids": delta.token_ids, "prefilled_by": delta.prefilled_by}
    if delta.finish_reason is not None:
        message["finish_reason"] = _FINISH[delta.finish_reason]
    if delta.usage is not None:
        message["usage"] = worker_pb2.Usage(
            prompt_tokens=delta.usage.prompt_tokens,
            completion_tokens=delta.usage.completion_tokens,
            cached_tokens=delta.usage.cached_tokens,
        )
    return worker_pb2.DecodeResponse(**message)
