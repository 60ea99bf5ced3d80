"""Workers that fail or leave: a prefill worker killed mid-prefill, a decode worker killed
while its KV is being computed, the ``fail`` policy, and a graceful drain on SIGTERM. These
tests kill processes, so they start their own next to the shared cluster."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.registry import SyncRegistryReader
from engine import SamplingParams
from proto import worker_pb2, worker_pb2_grpc
from tests.integration.workers_cluster import (
    NAMESPACE,
    Cluster,
    cluster_fixture,  # noqa: F401 - provides the `cluster` fixture
    reference_llm,
)
from tests.integration.workers_harness import (
    SMALL_ENGINE,
    DecodeResult,
    WorkerProcess,
    decode,
    decode_request,
    greedy,
    scrape,
    start_workers,
    status,
    wait_idle,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def own(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, WorkerProcess]]:
    common = ["--redis-url", redis_url, "--namespace", NAMESPACE, *SMALL_ENGINE]
    specs = [
        ("prefill_worker", "prefill-doomed", common),
        (
            "decode_worker",
            "decode-strict",
            [*common, "--on-prefill-failure", "fail", "--prefill-timeout", "3"],
        ),
        ("decode_worker", "decode-doomed", common),
    ]
    workers = start_workers(specs, tmp_path_factory.mktemp("own-workers"))
    try:
        yield {w.name: w for w in workers}
    finally:
        for worker in workers:
            worker.kill()


def dead_target() -> worker_pb2.PrefillTarget:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return worker_pb2.PrefillTarget(
            worker_id="gone", grpc_address=f"127.0.0.1:{sock.getsockname()[1]}"
        )


def test_fail_policy_answers_unavailable_and_frees_the_reservation(
    own: dict[str, WorkerProcess],
) -> None:
    strict = own["decode-strict"]
    with grpc.insecure_channel(strict.grpc_address) as channel:
        request = decode_request("strict", [1, 2, 3, 4, 5], greedy(4))
        request.prefill.CopyFrom(dead_target())
        with pytest.raises(grpc.RpcError) as info:
            decode(channel, request)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "gone" in (info.value.details() or "")
        wait_idle(channel)


def test_prefill_worker_killed_mid_prefill_falls_back_to_local(
    own: dict[str, WorkerProcess], cluster: Cluster
) -> None:
    doomed = own["prefill-doomed"]
    prompt = [(i * 7919) % 40000 + 100 for i in range(700)]  # seconds of prefill
    want = reference_llm().generate([prompt], SamplingParams(max_tokens=6, temperature=0.0))
    channel = cluster.channel(cluster.decode)
    result: list[DecodeResult] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(decode(channel, decode_request("doomed", prompt, greedy(6), doomed)))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: status(channel).waiting > 0, 20, "the transfer stage")
    time.sleep(0.3)  # the prefill worker is computing now
    doomed.signal(signal.SIGKILL)
    thread.join(60)
    assert not errors, errors
    assert result[0].prefilled_by == "local"
    assert result[0].tokens == want[0].token_ids
    wait_idle(channel)


def test_decode_worker_killed_mid_prefill_frees_the_prefill_workers_blocks(
    own: dict[str, WorkerProcess], cluster: Cluster
) -> None:
    doomed, prefill = own["decode-doomed"], cluster.prefill[0]
    prompt = [(i * 104729) % 40000 + 100 for i in range(700)]  # seconds of prefill
    finished_before = requests_finished(prefill)
    channel = grpc.insecure_channel(doomed.grpc_address)
    call = worker_pb2_grpc.DecodeWorkerStub(channel).Decode(
        decode_request("orphan", prompt, greedy(4), prefill), timeout=60
    )
    wait_until(lambda: status(channel).waiting > 0, 20, "the transfer stage")
    time.sleep(0.3)  # the prefill worker is computing now
    doomed.signal(signal.SIGKILL)
    with pytest.raises(grpc.RpcError):
        list(call)
    channel.close()
    # Its Prefill call died with the connection: the prefill worker dropped the request.
    wait_idle(cluster.channel(prefill))
    assert status(cluster.channel(prefill)).in_flight_transfers == 0
    assert requests_finished(prefill) == finished_before + 1  # it had the request


def requests_finished(worker: WorkerProcess) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in scrape(worker).splitlines()
        if line.startswith("pdserve_requests_total{")
    )


def test_sigterm_drains_in_flight_streams_then_exits(
    own: dict[str, WorkerProcess], redis_url: str
) -> None:
    worker = own["decode-strict"]
    channel = grpc.insecure_channel(worker.grpc_address)
    first = threading.Event()
    result: list[DecodeResult] = []

    def started(messages: int) -> bool:
        first.set()
        return False  # keep streaming

    def run() -> None:
        request = decode_request("draining", [10, 20, 30, 40], greedy(60, ignore_eos=True))
        result.append(decode(channel, request, on_message=started))

    thread = threading.Thread(target=run)
    thread.start()
    assert first.wait(30), "the stream did not start"
    worker.signal(signal.SIGTERM)
    health = health_pb2_grpc.HealthStub(channel)

    def not_serving() -> bool:
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

    wait_until(not_serving, 10, "health NOT_SERVING")
    with pytest.raises(grpc.RpcError) as info:
        decode(channel, decode_request("too-late", [1, 2, 3], greedy(2)))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    reader = SyncRegistryReader(redis_url, NAMESPACE)
    try:
        wait_until(
            lambda: worker.worker_id not in {w.worker_id for w in reader.list_workers()},
            10,
            "deregistration",
        )
    finally:
        reader.close()
    thread.join(60)
    assert result and len(result[0].tokens) == 60 and result[0].finish_reason
    assert worker.wait_exit(30) == 0
    channel.close()
