"""Prefill, decode and colocated workers as real processes: same tokens as one engine.

The cluster (two prefill workers, a decode worker fed by both, a colocated worker) is
shared by the session; see ``workers_cluster``. Every test ends with every worker holding
no referenced KV blocks — cached, unreferenced prefix blocks are allowed.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.registry import SyncRegistryReader
from proto import worker_pb2, worker_pb2_grpc
from tests.integration.workers_cluster import (
    MAX_TOKENS,
    NAMESPACE,
    PREFILL_TIMEOUT_S,
    Cluster,
    cluster_fixture,  # noqa: F401 - provides the `cluster` fixture
    expected,
    prompts,
)
from tests.integration.workers_harness import (
    WorkerProcess,
    decode,
    decode_request,
    greedy,
    metric,
    scrape,
    status,
    wait_idle,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def run_concurrently(
    channel: grpc.Channel, requests: list[worker_pb2.DecodeRequest]
) -> list[list[int]]:
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: decode(channel, r, timeout_s=120), requests))
    return [r.tokens for r in results]


def assert_all_idle(cluster: Cluster) -> None:
    for worker in cluster.workers:
        s = wait_idle(cluster.channel(worker))
        assert s.in_flight_transfers == 0, worker.name


def test_disaggregated_matches_single_engine(cluster: Cluster) -> None:
    prefill = cluster.prefill[0]
    requests = [
        decode_request(f"disagg-{i}", p, greedy(MAX_TOKENS), prefill)
        for i, p in enumerate(prompts())
    ]
    assert run_concurrently(cluster.channel(cluster.decode), requests) == expected()
    assert_all_idle(cluster)


def test_colocated_matches_single_engine(cluster: Cluster) -> None:
    requests = [
        decode_request(f"coloc-{i}", p, greedy(MAX_TOKENS)) for i, p in enumerate(prompts())
    ]
    assert run_concurrently(cluster.channel(cluster.colocated), requests) == expected()
    assert_all_idle(cluster)


def test_two_prefill_workers_feed_one_decode_worker(cluster: Cluster) -> None:
    channel = cluster.channel(cluster.decode)
    requests = [
        decode_request(f"two-{i}", p, greedy(MAX_TOKENS), cluster.prefill[i % 2])
        for i, p in enumerate(prompts())
    ]
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: decode(channel, r, timeout_s=120), requests))
    assert [r.tokens for r in results] == expected()
    assert [r.prefilled_by for r in results] == [
        cluster.prefill[i % 2].worker_id for i in range(len(requests))
    ]
    for r, prompt in zip(results, prompts(), strict=True):
        assert r.usage is not None and r.usage.prompt_tokens == len(prompt)
        assert r.usage.completion_tokens == len(r.tokens)
    assert_all_idle(cluster)


def test_registry_load_and_kv_events(cluster: Cluster) -> None:
    reader = SyncRegistryReader(cluster.redis_url, NAMESPACE)
    try:
        infos = {info.worker_id: info for info in reader.list_workers()}
        ids = {w.worker_id for w in cluster.workers}
        assert ids <= set(infos)
        for worker in cluster.workers:
            info = infos[worker.worker_id]
            assert info.grpc_address == worker.grpc_address
            assert info.pool == "default"
            assert info.geometry.num_blocks == 256 and info.geometry.block_size == 16
            assert info.geometry.num_layers == 30 and info.geometry.num_kv_heads == 3
        assert infos["decode-a"].role.value == "decode"
        assert infos["decode-a"].kv_address == cluster.decode.kv_address
        assert infos["prefill-a"].role.value == "prefill" and infos["prefill-a"].kv_address is None
        assert infos["colocated-a"].role.value == "colocated"
        loads = reader.loads()
        assert ids <= set(loads)
        assert all(loads[i].free_blocks + loads[i].used_blocks == 256 for i in ids)
    finally:
        reader.close()
    # Run something on both prefill workers so they have stored blocks to announce.
    channel = cluster.channel(cluster.decode)
    for i, worker in enumerate(cluster.prefill):
        decode(channel, decode_request(f"events-{i}", prompts()[6], greedy(2), worker))
    client = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:

        def stored_by() -> set[str]:
            entries = client.xrange(f"{NAMESPACE}:kv:default")
            return {f["worker_id"] for _, f in entries if f["type"] == "stored"}

        # Every role announces its prefix cache: the decode worker's landed blocks are
        # prefix-cacheable, and conditional disaggregation routes on them.
        wait_until(
            lambda: {"prefill-a", "prefill-b", "decode-a"} <= stored_by(), 5, "stored events"
        )
    finally:
        client.close()


def test_health_reflection_and_metrics(cluster: Cluster) -> None:
    for worker, service in [
        (cluster.decode, "pdserve.worker.v1.DecodeWorker"),
        (cluster.colocated, "pdserve.worker.v1.DecodeWorker"),
        (cluster.prefill[0], "pdserve.worker.v1.PrefillWorker"),
    ]:
        channel = cluster.channel(worker)
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", service, "pdserve.worker.v1.WorkerControl"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
        assert {service, "pdserve.worker.v1.WorkerControl", "grpc.health.v1.Health"} <= names

    decode_text = scrape(cluster.decode)
    for name in (
        "pdserve_ttft_seconds_bucket",
        "pdserve_itl_seconds_bucket",
        "pdserve_queue_depth{",
        "pdserve_running_requests",
        'pdserve_kv_blocks{state="free"}',
        'pdserve_kv_transfer_bytes_total{role="receiver"}',
        "pdserve_kv_transfer_seconds_bucket",
        "pdserve_prefix_hit_tokens_total",
    ):
        assert name in decode_text, name
    prefill_text = scrape(cluster.prefill[0])
    for name in (
        "pdserve_ttft_seconds_bucket",
        'pdserve_kv_transfer_bytes_total{role="sender"}',
        "pdserve_prefix_hit_tokens_total",
        'pdserve_queue_depth{queue="in_flight"}',
    ):
        assert name in prefill_text, name


@pytest.mark.parametrize("via", ["decode", "colocated"])
def test_bad_input_is_rejected_and_the_worker_keeps_serving(cluster: Cluster, via: str) -> None:
    worker = cluster.decode if via == "decode" else cluster.colocated
    prefill = cluster.prefill[0] if via == "decode" else None
    channel = cluster.channel(worker)
    bad = {
        "empty": ([], greedy(4)),
        "out of vocabulary": ([1, 2, 49152], greedy(4)),
        "longer than the context": ([5] * 8200, greedy(4)),
        "max_tokens 0": ([1, 2, 3], greedy(0)),
        "negative temperature": ([1, 2], worker_pb2.SamplingParams(max_tokens=2, temperature=-1)),
        "top_p above 1": ([1, 2], worker_pb2.SamplingParams(max_tokens=2, top_p=1.5)),
    }
    for what, (prompt, sampling) in bad.items():
        with pytest.raises(grpc.RpcError) as info:
            decode(channel, decode_request(what, prompt, sampling, prefill))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
    # 4100 tokens fit the context (8192) but never 256 blocks of 16 tokens.
    with pytest.raises(grpc.RpcError) as info:
        decode(channel, decode_request("huge", [5] * 4100, greedy(2), prefill))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ok = decode(channel, decode_request("after", prompts()[0], greedy(MAX_TOKENS), prefill))
    assert ok.tokens == expected()[0]
    assert_all_idle(cluster)


def test_prefill_worker_rejects_bad_requests(cluster: Cluster) -> None:
    stub = worker_pb2_grpc.PrefillWorkerStub(cluster.channel(cluster.prefill[0]))
    good = dict(
        request_id="p",
        token_ids=list(range(1, 40)),
        sampling=greedy(1),
        transfer_id="t",
        kv_address=cluster.decode.kv_address,
        num_blocks=3,
    )
    for change in (
        {"num_blocks": 2},
        {"token_ids": []},
        {"kv_address": "nowhere"},
        {"transfer_id": ""},
        {"token_ids": [60000]},
    ):
        with pytest.raises(grpc.RpcError) as info:
            stub.Prefill(worker_pb2.PrefillRequest(**{**good, **change}), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, change
    assert_all_idle(cluster)


def test_cancel_during_decode_frees_blocks_everywhere(cluster: Cluster) -> None:
    for i, worker in enumerate([cluster.decode, cluster.colocated]):
        prefill = cluster.prefill[1] if worker is cluster.decode else None
        request = decode_request(f"cancel-decode-{i}", prompts()[1], greedy(300, True), prefill)
        result = decode(cluster.channel(worker), request, on_message=lambda n: n == 3)
        assert len(result.tokens) == 3 and result.finish_reason == 0
    assert_all_idle(cluster)


def test_cancel_during_prefill_frees_blocks_everywhere(cluster: Cluster) -> None:
    prefill = cluster.prefill[0]
    stub = worker_pb2_grpc.DecodeWorkerStub(cluster.channel(cluster.decode))
    cancelled_before = metric(prefill, 'pdserve_requests_total{outcome="cancelled"}')
    # ~700 new tokens: a prefill step of seconds on one CPU thread.
    prompt = [(i * 7919) % 40000 + 100 for i in range(700)]
    call = stub.Decode(decode_request("cancel-prefill", prompt, greedy(8), prefill), timeout=60)
    # The decode worker's status is cheap (its engine is idle): waiting > 0 once it reserved
    # the blocks and called the prefill worker.
    decode_channel = cluster.channel(cluster.decode)
    wait_until(lambda: status(decode_channel).waiting > 0, 20, "the transfer stage")
    time.sleep(0.2)
    call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert_all_idle(cluster)
    # The prefill worker had the request and was told to drop it.
    assert metric(prefill, 'pdserve_requests_total{outcome="cancelled"}') == cancelled_before + 1


def test_deadline_exceeded_frees_blocks(cluster: Cluster) -> None:
    for worker, prefill in [(cluster.decode, cluster.prefill[0]), (cluster.colocated, None)]:
        request = decode_request("deadline", prompts()[3], greedy(400, True), prefill)
        with pytest.raises(grpc.RpcError) as info:
            decode(cluster.channel(worker), request, timeout_s=1.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_all_idle(cluster)


def test_unreachable_prefill_worker_falls_back_to_local_prefill(cluster: Cluster) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = worker_pb2.PrefillTarget(
            worker_id="gone", grpc_address=f"127.0.0.1:{sock.getsockname()[1]}"
        )
    request = decode_request("dead-prefill", prompts()[4], greedy(MAX_TOKENS))
    request.prefill.CopyFrom(dead)
    result = decode(cluster.channel(cluster.decode), request)
    assert result.tokens == expected()[4] and result.prefilled_by == "local"
    assert_all_idle(cluster)


class _HungPrefill(worker_pb2_grpc.PrefillWorkerServicer):
    """Accepts Prefill calls and never answers, until the caller gives up."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.ServicerContext) -> None:
        while context.is_active():
            time.sleep(0.02)
        self.cancelled.set()
        context.abort(grpc.StatusCode.CANCELLED, "caller went away")


def test_prefill_timeout_falls_back_to_local_prefill(cluster: Cluster) -> None:
    hung = _HungPrefill()
    server = grpc.server(ThreadPoolExecutor(2))
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(hung, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        request = decode_request("hung-prefill", prompts()[5], greedy(MAX_TOKENS))
        request.prefill.CopyFrom(
            worker_pb2.PrefillTarget(worker_id="hung", grpc_address=f"127.0.0.1:{port}")
        )
        started = time.monotonic()
        result = decode(cluster.channel(cluster.decode), request)
        waited = time.monotonic() - started
        assert result.tokens == expected()[5] and result.prefilled_by == "local"
        assert PREFILL_TIMEOUT_S <= waited < PREFILL_TIMEOUT_S + 10
        assert hung.cancelled.wait(5), "the decode worker did not cancel the Prefill call"
        assert_all_idle(cluster)
    finally:
        server.stop(0)


@pytest.mark.timeout(300)
def test_500_requests_with_random_cancellations_leave_no_blocks_behind(cluster: Cluster) -> None:
    """Short prompts (shared prefixes), 2-8 tokens, 20% cancelled at a random moment —
    waiting for blocks, in prefill, in transfer, or decoding. Afterwards no worker holds a
    referenced block; greedy outputs of the same prompt agree whatever path they took."""
    rng = random.Random(4)
    routes: list[tuple[WorkerProcess, WorkerProcess | None]] = [
        (cluster.decode, cluster.prefill[0]),
        (cluster.decode, cluster.prefill[1]),
        (cluster.colocated, None),
    ]
    plan = []
    for i in range(500):
        base = prompts()[rng.randrange(len(prompts()))]
        prompt = base[: rng.randint(1, min(len(base), 40))]
        worker, prefill = routes[i % len(routes)]
        cancel_after = rng.uniform(0.0, 0.8) if rng.random() < 0.2 else None
        request = decode_request(f"stress-{i}", prompt, greedy(rng.randint(2, 8), True), prefill)
        plan.append((worker, request, cancel_after))

    async def one(
        stubs: dict[str, worker_pb2_grpc.DecodeWorkerStub],
        worker: WorkerProcess,
        request: worker_pb2.DecodeRequest,
        cancel_after: float | None,
    ) -> tuple[str, list[int]]:
        call = stubs[worker.name].Decode(request, timeout=120)

        async def consume() -> list[int]:
            tokens: list[int] = []
            async for message in call:
                tokens.extend(message.token_ids)
                if message.finish_reason:
                    return tokens
            raise AssertionError("stream ended without a finish reason")

        if cancel_after is None:
            return "done", await consume()
        task = asyncio.ensure_future(consume())
        await asyncio.sleep(cancel_after)
        call.cancel()
        try:
            return "done", await task
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            return "cancelled", []

    async def run_all() -> list[tuple[str, list[int]]]:
        channels = {w.name: grpc.aio.insecure_channel(w.grpc_address) for w in cluster.workers}
        stubs = {name: worker_pb2_grpc.DecodeWorkerStub(ch) for name, ch in channels.items()}
        limit = asyncio.Semaphore(24)

        async def bounded(item: tuple) -> tuple[str, list[int]]:
            async with limit:
                return await one(stubs, *item)

        try:
            return await asyncio.gather(*(bounded(item) for item in plan))
        finally:
            for channel in channels.values():
                await channel.close()

    results = asyncio.run(run_all())
    cancelled = sum(1 for outcome, _ in results if outcome == "cancelled")
    assert 50 <= cancelled <= 150, cancelled
    outputs: dict[tuple[int, ...], list[int]] = {}
    for (_, request, _), (outcome, tokens) in zip(plan, results, strict=True):
        if outcome != "done":
            continue
        assert len(tokens) == request.sampling.max_tokens
        key = tuple(request.token_ids)
        seen = outputs.setdefault(key, tokens)
        shorter = min(len(seen), len(tokens))
        assert seen[:shorter] == tokens[:shorter], request.request_id
        if len(tokens) > len(seen):
            outputs[key] = tokens
    assert_all_idle(cluster)
    for worker in cluster.workers:
        s = status(cluster.channel(worker))
        assert s.used_blocks == 0 and s.free_blocks == s.total_blocks, worker.name


def test_prefill_worker_reuses_its_prefix_cache(cluster: Cluster) -> None:
    prefill, channel = cluster.prefill[1], cluster.channel(cluster.decode)
    prompt = [(i * 31) % 30000 + 500 for i in range(70)]  # seen by no other test
    hits_before = metric(prefill, "pdserve_prefix_hit_tokens_total")
    first = decode(channel, decode_request("prefix-1", prompt, greedy(3), prefill))
    second = decode(channel, decode_request("prefix-2", [*prompt, 42, 43], greedy(3), prefill))
    assert first.usage is not None and first.usage.cached_tokens == 0
    # The 70-token prompt left 4 full blocks (64 tokens) in the prefill worker's cache.
    assert second.usage is not None and second.usage.cached_tokens == 64
    assert second.prefilled_by == prefill.worker_id
    assert metric(prefill, "pdserve_prefix_hit_tokens_total") == hits_before + 64
    assert_all_idle(cluster)
