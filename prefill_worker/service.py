"""The PrefillWorker gRPC servicer: proto ↔ dataclass translation and status codes, only.

The request's stages live in :mod:`prefill_worker.prefill`. A cancelled call (the decode
worker gave up, or died) cancels the handler, which aborts the prefill and its KV send.
"""

from __future__ import annotations

import time

import grpc

from common.sampling import SamplingParams
from common.worker_runtime import RequestError
from engine.async_engine import EngineStopped
from prefill_worker.prefill import Prefiller, PrefillJob
from proto import worker_pb2, worker_pb2_grpc

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, prefiller: Prefiller) -> None:
        self._prefiller = prefiller

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        try:
            job = job_from_proto(request, context.time_remaining())
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            result = await self._prefiller.run(job)
        except RequestError as exc:
            await context.abort(grpc.StatusCode[exc.kind.name], str(exc))
        except EngineStopped as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine stopped: {exc}")
        return worker_pb2.PrefillResponse(
            first_token=result.first_token,
            cached_tokens=result.cached_tokens,
            prompt_tokens=result.prompt_tokens,
            kv_bytes=result.kv_bytes,
            transfer_seconds=result.transfer_seconds,
        )


def job_from_proto(request: worker_pb2.PrefillRequest, time_remaining: float | None) -> PrefillJob:
    return PrefillJob(
        request_id=request.request_id,
        prompt=tuple(request.token_ids),
        params=sampling_from_proto(request.sampling),
        transfer_id=request.transfer_id,
        kv_address=request.kv_address,
        num_blocks=request.num_blocks,
        layer_wise=request.layer_wise,
        deadline=None if time_remaining is None else time.monotonic() + time_remaining,
    )


def sampling_from_proto(sampling: worker_pb2.SamplingParams) -> SamplingParams:
    """ValueError on invalid values. Only the first token is sampled here, so max_tokens
    0 (unset) is accepted; top_p 0 is the proto default and means unset."""
    return SamplingParams(
        max_tokens=max(sampling.max_tokens, 1),
        temperature=sampling.temperature,
        top_p=sampling.top_p or 1.0,
        top_k=sampling.top_k,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop_token_ids=tuple(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
    )
