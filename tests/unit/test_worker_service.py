"""Proto ↔ dataclass translation of the worker boundaries (:mod:`messages`), used by the
servicers and their clients alike, and the small shared pieces of the worker runtime."""

from __future__ import annotations

import time

import grpc
import pytest

from common.errors import ErrorCode
from common.generation import FinishReason, Usage
from common.sampling import SamplingParams
from messages import decode_proto, prefill_proto
from messages.decode import DecodeJob, PrefillTarget, TokenDelta
from messages.grpc_status import status_code
from messages.prefill import PrefillJob, PrefillResult
from messages.sampling_proto import sampling_from_proto, sampling_to_proto
from messages.status import WorkerStatus
from messages.status_proto import status_from_proto, status_to_proto
from proto import worker_pb2
from worker.latency import LatencyWindow


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
    job = decode_proto.job_from_proto(request, 2.0)
    assert job.request_id == "r1" and job.prompt == (5, 6, 7)
    assert job.params == SamplingParams(4, 0.5, 1.0, 3, 9, (2,), True)  # top_p 0 → 1
    assert job.prefill is not None and job.prefill.worker_id == "p"
    assert job.deadline is not None and before + 2.0 <= job.deadline <= time.monotonic() + 2.0


def test_decode_request_defaults() -> None:
    job = decode_proto.job_from_proto(
        worker_pb2.DecodeRequest(token_ids=[1], sampling=worker_pb2.SamplingParams(max_tokens=1)),
        None,
    )
    assert job.request_id and job.prefill is None and job.deadline is None
    assert job.params.seed is None and job.params.greedy
    # An empty address means "no prefill worker": prefill here.
    request = worker_pb2.DecodeRequest(prefill=worker_pb2.PrefillTarget(worker_id="p"))
    request.token_ids.append(1)
    request.sampling.max_tokens = 1
    assert decode_proto.job_from_proto(request, None).prefill is None


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
        sampling_from_proto(sampling)
    request = worker_pb2.DecodeRequest(token_ids=[1], sampling=sampling)
    with pytest.raises(ValueError):  # what the decode servicer answers INVALID_ARGUMENT to
        decode_proto.job_from_proto(request, None)


def test_sampling_round_trip_through_the_prefill_request() -> None:
    for params in (SamplingParams(7, 0.0), SamplingParams(3, 0.75, 0.5, 20, 123, (4, 5), True)):
        wire = worker_pb2.SamplingParams.FromString(sampling_to_proto(params).SerializeToString())
        assert sampling_from_proto(wire) == params
        # The prefill side samples one token; it keeps everything else.
        job = PrefillJob("r", (1,), params, "t", "127.0.0.1:9", 1, True)
        request = worker_pb2.PrefillRequest.FromString(
            prefill_proto.job_to_proto(job).SerializeToString()
        )
        assert prefill_proto.job_from_proto(request, None).params == params
    unset = worker_pb2.PrefillRequest(token_ids=[1], sampling=worker_pb2.SamplingParams())
    assert prefill_proto.job_from_proto(unset, None).params.max_tokens == 1


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
    job = prefill_proto.job_from_proto(request, None)
    assert (job.prompt, job.transfer_id, job.kv_address, job.num_blocks, job.layer_wise) == (
        (1, 2),
        "d/r#0",
        "127.0.0.1:9",
        1,
        True,
    )
    assert job.deadline is None


def test_delta_to_proto() -> None:
    first = decode_proto.delta_to_proto(TokenDelta([42], prefilled_by="p0"))
    assert list(first.token_ids) == [42] and first.prefilled_by == "p0"
    assert first.finish_reason == worker_pb2.FINISH_REASON_UNSPECIFIED
    assert not first.HasField("usage")
    last = decode_proto.delta_to_proto(TokenDelta([], FinishReason.LENGTH, Usage(10, 4, 8)))
    assert last.finish_reason == worker_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.cached_tokens) == (
        10,
        4,
        8,
    )
    for reason in FinishReason:
        assert decode_proto.delta_to_proto(TokenDelta([], reason)).finish_reason != 0


def test_decode_job_and_deltas_round_trip() -> None:
    """The router's side of the boundary writes what the decode worker's side reads."""
    params = SamplingParams(5, 0.5, 0.75, 4, 7, (3,), False)  # float32-exact on the wire
    for prefill in (PrefillTarget("p", "127.0.0.1:1"), None):
        job = DecodeJob("r.1", (5, 6), params, prefill)
        wire = worker_pb2.DecodeRequest.FromString(
            decode_proto.job_to_proto(job).SerializeToString()
        )
        assert decode_proto.job_from_proto(wire, None) == job
    for delta in (
        TokenDelta((42,), None, Usage(3, 1, 2), "p0"),
        TokenDelta((), FinishReason.ABORT),
        TokenDelta((1, 2), FinishReason.STOP, Usage(3, 5, 0)),
    ):
        wire_delta = worker_pb2.DecodeResponse.FromString(
            decode_proto.delta_to_proto(delta).SerializeToString()
        )
        assert decode_proto.delta_from_proto(wire_delta) == delta


def test_prefill_result_and_status_round_trip() -> None:
    result = PrefillResult(9, 16, 40, 1 << 20, 0.25)
    wire = worker_pb2.PrefillResponse.FromString(
        prefill_proto.result_to_proto(result).SerializeToString()
    )
    assert prefill_proto.result_from_proto(wire) == result
    status = WorkerStatus("d-0", "decode", "default", 1, 2, 3, 4, 5, 12, 1, True)
    assert status_from_proto(status_to_proto(status)) == status


def test_every_error_code_has_a_grpc_status() -> None:
    for code in ErrorCode:
        assert status_code(code) is getattr(grpc.StatusCode, code.name)


def test_latency_window_forgets_old_samples() -> None:
    window = LatencyWindow(window_s=0.05)
    assert window.mean_ms() is None
    window.add(0.010)
    window.add(0.030)
    assert window.mean_ms() == pytest.approx(20.0)
    time.sleep(0.06)
    assert window.mean_ms() is None
