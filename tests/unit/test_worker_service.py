"""Proto ↔ dataclass translation of the worker servicers and client, and the small
shared pieces of the worker runtime."""

from __future__ import annotations

import time

import grpc
import pytest

from common.sampling import SamplingParams
from common.worker_runtime import ErrorKind, LatencyWindow
from decode_worker import service as decode_service
from decode_worker.job import TokenDelta, Usage
from decode_worker.prefill_client import sampling_to_proto
from engine.sequence import FinishReason
from prefill_worker import service as prefill_service
from proto import worker_pb2


def test_decode_request_to_job() -> None:
    request = worker_pb2.DecodeRequest(
        request_id="r1",
        token_ids=[5, 6, 7],
        sampling=worker_pb2.SamplingParams(
            max_tokens=4, temperature=0.5, top_k=3, seed=9, stop_token_ids=[2], ignore_eos=True
        ),
        prefill=worker_pb2.PrefillTarget(worker_id="p", grpc_address="127.0.0.1:1"),
    )
    before = time.monotonic()
    job = decode_service.job_from_proto(request, 2.0)
    assert job.request_id == "r1" and job.prompt == (5, 6, 7)
    assert job.params == SamplingParams(4, 0.5, 1.0, 3, 9, (2,), True)  # top_p 0 → 1
    assert job.prefill is not None and job.prefill.worker_id == "p"
    assert job.deadline is not None and before + 2.0 <= job.deadline <= time.monotonic() + 2.0


def test_decode_request_defaults() -> None:
    job = decode_service.job_from_proto(
        worker_pb2.DecodeRequest(token_ids=[1], sampling=worker_pb2.SamplingParams(max_tokens=1)),
        None,
    )
    assert job.request_id and job.prefill is None and job.deadline is None
    assert job.params.seed is None and job.params.greedy
    # An empty address means "no prefill worker": prefill here.
    request = worker_pb2.DecodeRequest(prefill=worker_pb2.PrefillTarget(worker_id="p"))
    request.token_ids.append(1)
    request.sampling.max_tokens = 1
    assert decode_service.job_from_proto(request, None).prefill is None


@pytest.mark.parametrize(
    "sampling",
    [
        worker_pb2.SamplingParams(max_tokens=0),
        worker_pb2.SamplingParams(max_tokens=1, temperature=-0.5),
        worker_pb2.SamplingParams(max_tokens=1, top_p=1.5),
    ],
)
def test_invalid_sampling_is_a_value_error(sampling: worker_pb2.SamplingParams) -> None:
    with pytest.raises(ValueError):
        decode_service.sampling_from_proto(sampling)


def test_sampling_round_trip_through_the_prefill_request() -> None:
    for params in (SamplingParams(7, 0.0), SamplingParams(3, 0.75, 0.5, 20, 123, (4, 5), True)):
        wire = worker_pb2.SamplingParams.FromString(sampling_to_proto(params).SerializeToString())
        assert decode_service.sampling_from_proto(wire) == params
        # The prefill side samples one token; it keeps everything else.
        assert prefill_service.sampling_from_proto(wire) == params
    unset = worker_pb2.SamplingParams()
    assert prefill_service.sampling_from_proto(unset).max_tokens == 1


def test_prefill_request_to_job() -> None:
    request = worker_pb2.PrefillRequest(
        request_id="r",
        token_ids=[1, 2],
        sampling=worker_pb2.SamplingParams(max_tokens=3),
        transfer_id="d/r#0",
        kv_address="127.0.0.1:9",
        num_blocks=1,
        layer_wise=True,
    )
    job = prefill_service.job_from_proto(request, None)
    assert (job.prompt, job.transfer_id, job.kv_address, job.num_blocks, job.layer_wise) == (
        (1, 2),
        "d/r#0",
        "127.0.0.1:9",
        1,
        True,
    )
    assert job.deadline is None


def test_delta_to_proto() -> None:
    first = decode_service.delta_to_proto(TokenDelta([42], prefilled_by="p0"))
    assert list(first.token_ids) == [42] and first.prefilled_by == "p0"
    assert first.finish_reason == worker_pb2.FINISH_REASON_UNSPECIFIED
    assert not first.HasField("usage")
    last = decode_service.delta_to_proto(TokenDelta([], FinishReason.LENGTH, Usage(10, 4, 8)))
    assert last.finish_reason == worker_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.cached_tokens) == (
        10,
        4,
        8,
    )
    for reason in FinishReason:
        assert decode_service.delta_to_proto(TokenDelta([], reason)).finish_reason != 0


def test_every_error_kind_has_a_grpc_status() -> None:
    for kind in ErrorKind:
        assert decode_service.status_code(kind) is getattr(grpc.StatusCode, kind.name)


def test_latency_window_forgets_old_samples() -> None:
    window = LatencyWindow(window_s=0.05)
    assert window.mean_ms() is None
    window.add(0.010)
    window.add(0.030)
    assert window.mean_ms() == pytest.approx(20.0)
    time.sleep(0.06)
    assert window.mean_ms() is None
