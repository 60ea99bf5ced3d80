"""Overload control's edges, one unit each: config keys, the priority and client id on the
way in (gRPC proto, OpenAI JSON), on to the workers (worker proto), and the refusal's
hint on the way out (trailing metadata, HTTP headers)."""

from __future__ import annotations

import grpc
import pytest
from pydantic import ValidationError

from common.errors import RETRY_AFTER_METADATA, ErrorCode, RequestError
from common.sampling import SamplingParams
from messages import decode_proto, prefill_proto
from messages.decode import DecodeJob
from messages.grpc_status import retry_after_ms
from messages.prefill import PrefillJob
from router import api_proto
from router import openai_convert as oc
from router.api import GenerateInput
from router.auth import client_id_of
from router.client import build_request
from router.config import LimitsConfig, RouterConfig
from router.request import check_input
from worker.config import WorkerConfig
from worker.latency import LatencyWindow


def test_router_config_keys() -> None:
    default = RouterConfig()
    assert default.default_deadline_s == 300.0
    assert (default.pools[0].max_in_flight, default.pools[0].max_queued) == (256, 512)
    config = RouterConfig.from_mapping(
        {
            "default_deadline_s": None,
            "pools": [{"name": "chat", "max_in_flight": 4, "max_queued": 0}],
        }
    )
    assert config.default_deadline_s is None
    assert (config.pools[0].max_in_flight, config.pools[0].max_queued) == (4, 0)
    for bad in (
        {"default_deadline_s": 0},
        {"pools": [{"name": "p", "max_in_flight": 0}]},
        {"pools": [{"name": "p", "max_queued": -1}]},
        {"pools": [{"name": "p", "max_queud": 3}]},
    ):
        with pytest.raises(ValueError):
            RouterConfig.from_mapping(bad)


def test_worker_config_keys() -> None:
    config = WorkerConfig.from_mapping({"role": "decode", "engine": {"max_num_seqs": 8}})
    assert config.active_limit == 8 and config.admission_queue_size == 256
    config = WorkerConfig.from_mapping(
        {"role": "prefill", "max_active_requests": 3, "admission_queue_size": 0}
    )
    assert config.active_limit == 3 and config.admission_queue_size == 0
    for bad in ({"max_active_requests": 0}, {"admission_queue_size": -1}):
        with pytest.raises(ValueError):
            WorkerConfig.from_mapping({"role": "decode", **bad})


def test_priority_and_client_id_are_checked() -> None:
    limits = LimitsConfig()
    ok = GenerateInput(prompt="hi", priority=9, client_id="team-a")
    assert check_input(ok, limits)
    for bad, needle in (
        (GenerateInput(prompt="hi", priority=10), "priority"),
        (GenerateInput(prompt="hi", priority=-1), "priority"),
        (GenerateInput(prompt="hi", client_id="x" * 129), "client id"),
        (GenerateInput(prompt="hi", client_id="a\nb"), "client id"),
    ):
        with pytest.raises(RequestError) as info:
            check_input(bad, limits)
        assert info.value.code is ErrorCode.INVALID_ARGUMENT and needle in info.value.message


def test_priority_travels_through_the_public_proto() -> None:
    request = build_request("hi", priority=1)
    assert request.priority == 1
    assert api_proto.input_from_proto(request).priority == 1
    assert api_proto.input_from_proto(build_request("hi")).priority == 0


def test_priority_and_client_id_travel_to_the_workers() -> None:
    params = SamplingParams(max_tokens=4)
    job = DecodeJob("r", (1, 2), params, None, priority=1, client_id="c")
    back = decode_proto.job_from_proto(decode_proto.job_to_proto(job), None)
    assert (back.priority, back.client_id) == (1, "c")
    pjob = PrefillJob("r", (1, 2), params, "t", "127.0.0.1:1", 1, True, priority=1, client_id="c")
    pback = prefill_proto.job_from_proto(prefill_proto.job_to_proto(pjob), None)
    assert (pback.priority, pback.client_id) == (1, "c")


def test_openai_priority_user_and_429_headers() -> None:
    _, inputs = oc.parse_completion({"prompt": "a", "priority": 1, "user": "u1"}, "c")
    assert (inputs[0].priority, inputs[0].client_id) == (1, "u1")
    _, chat = oc.parse_chat({"messages": [{"role": "user", "content": "a"}]}, "c")
    assert (chat[0].priority, chat[0].client_id) == (0, "")
    with pytest.raises(ValidationError):
        oc.parse_completion({"prompt": "a", "priority": 10}, "c")
    reply = oc.request_error_reply(RequestError(ErrorCode.RESOURCE_EXHAUSTED, "full", 1500))
    assert reply.status == 429
    assert reply.headers == {"Retry-After": "2", "retry-after-ms": "1500"}
    assert reply.body["error"]["code"] == "rate_limit_exceeded"
    bare = oc.request_error_reply(RequestError(ErrorCode.RESOURCE_EXHAUSTED, "full"))
    assert bare.headers["Retry-After"] == str(oc.RETRY_AFTER_S)
    assert oc.request_error_reply(RequestError(ErrorCode.DEADLINE_EXCEEDED, "late")).status == 504


def test_retry_after_metadata_is_read_back() -> None:
    def error(metadata: tuple[tuple[str, str], ...]) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(*metadata),
            "full",
        )

    assert retry_after_ms(error(((RETRY_AFTER_METADATA, "250"),))) == 250
    assert retry_after_ms(error(((RETRY_AFTER_METADATA, "soon"),))) is None
    assert retry_after_ms(error(())) is None


def test_api_key_fingerprint_is_the_default_client_id() -> None:
    fingerprint = client_id_of("Bearer sk-secret")
    assert fingerprint.startswith("key-") and "secret" not in fingerprint
    assert fingerprint == client_id_of("bearer sk-secret") != client_id_of("Bearer other")
    assert client_id_of(None) == "" and client_id_of("Basic x") == ""


def test_queue_time_p90() -> None:
    window = LatencyWindow()
    assert window.percentile_ms(0.9) is None
    for ms in range(1, 11):
        window.add(ms / 1000)
    assert window.percentile_ms(0.9) == pytest.approx(9.0)
    assert window.percentile_ms(1.0) == pytest.approx(10.0)
