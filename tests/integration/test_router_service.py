"""The router against real Redis and in-process fake workers (real gRPC, scripted replies).

Covers the router's own behaviour — statuses, retries, cancellation, deadlines, stop
strings, streaming text, prefix routing fed by KV events, several routers side by side,
health / reflection / metrics — without the model. The same behaviour against real workers
is in test_router_workers.py.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.hashing import block_hashes
from common.worker_info import WorkerRole
from proto import serving_pb2, worker_pb2
from router import client as router_client
from router.client import build_request
from router.server import RouterServer
from router.tokenizer import ModelTokenizer, default_model_dir
from tests.integration.router_fakes import BLOCK_SIZE, FakeCluster, Script
from tests.integration.router_helpers import (
    generate,
    run_bounded,
    start_router,
    status_of,
    stub,
    text_of,
    tokens_of,
    wait_for,
    wait_workers,
)

pytestmark = pytest.mark.timeout(60)

SYSTEM = "You are a meticulous assistant. " * 20  # ~140 tokens: 8+ shared blocks


@pytest.fixture(scope="module")
def tok() -> ModelTokenizer:
    return ModelTokenizer.load(default_model_dir())


@pytest.fixture
def namespace() -> str:
    return f"rt-{uuid.uuid4().hex[:8]}"


Scenario = Callable[[FakeCluster, RouterServer, grpc.aio.Channel], Awaitable[None]]


def run(redis_url: str, namespace: str, scenario: Scenario, **router_config: object) -> None:
    async def main() -> None:
        cluster = FakeCluster(redis_url, namespace)
        router = await start_router(redis_url, namespace, **router_config)
        try:
            async with grpc.aio.insecure_channel(router.address) as channel:
                await scenario(cluster, router, channel)
        finally:
            await router.stop(grace_s=0)
            await cluster.close()

    run_bounded(main(), timeout_s=40)


def ok_response(responses: list[serving_pb2.GenerateResponse]) -> None:
    assert responses and responses[-1].finish_reason != serving_pb2.FINISH_REASON_UNSPECIFIED
    assert all(r.finish_reason == 0 for r in responses[:-1])
    assert responses[0].HasField("route") and not any(r.HasField("route") for r in responses[1:])
    assert responses[-1].HasField("usage")


# ---- statuses ---------------------------------------------------------------------------------


def test_every_status_and_the_router_keeps_serving(redis_url: str, namespace: str) -> None:
    def refuse(request: worker_pb2.DecodeRequest) -> Script:
        return Script(tokens=[], fail_before=grpc.StatusCode.RESOURCE_EXHAUSTED)

    async def scenario(cluster: FakeCluster, router: RouterServer, ch: grpc.aio.Channel) -> None:
        await cluster.add("p0", WorkerRole.PREFILL, "main")
        await cluster.add("d0", WorkerRole.DECODE, "main")
        await cluster.add("f0", WorkerRole.DECODE, "full", refuse)
        await cluster.add("f1", WorkerRole.DECODE, "full", refuse)
        await wait_workers(router, "main", 2)
        await wait_workers(router, "full", 2)
        client = stub(ch)
        cases = [
            ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
            ({"messages": [("robot", "hi")]}, grpc.StatusCode.INVALID_ARGUMENT, "unknown role"),
            (
                {"prompt": "hi", "max_tokens": 9000},
                grpc.StatusCode.INVALID_ARGUMENT,
                "max_tokens 9000 is too large",
            ),
            (
                {"prompt": "hi", "temperature": -1.0},
                grpc.StatusCode.INVALID_ARGUMENT,
                "temperature",
            ),
            ({"prompt": "hi", "top_p": 2.0}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
            ({"prompt": "x" * 1_000_001}, grpc.StatusCode.INVALID_ARGUMENT, "request too large"),
            ({"token_ids": [1, 10**6]}, grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
            ({"prompt": "hi", "model": "gpt-17"}, grpc.StatusCode.NOT_FOUND, "unknown model"),
            (
                {"prompt": "hi", "model": "full"},
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "every worker of pool 'full' refused",
            ),
            (
                {"prompt": "hi", "model": "empty"},
                grpc.StatusCode.UNAVAILABLE,
                "pool 'empty' has no live worker",
            ),
        ]
        for options, code, needle in cases:
            got, details = await status_of(client, **options)
            assert (got, needle in details) == (code, True), (options.keys(), got, details)
            good = await generate(client, "Hello", model="main", max_tokens=4)
            ok_response(good)
        assert len(cluster.workers["f0"].calls.requests) == 1  # each refused once, no loop
        assert len(cluster.workers["f1"].calls.requests) == 1
        metrics = router.metrics.metrics.render().decode()
        for status in ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE"):
            assert f'status="{status}"' in metrics
        assert 'pdserve_router_retries_total{pool="full",reason="refused"} 2.0' in metrics

    pools = [{"name": "main"}, {"name": "full"}, {"name": "empty"}]
    run(redis_url, namespace, scenario, pools=pools)


def test_a_worker_error_the_client_caused_is_passed_through(redis_url: str, namespace: str) -> None:
    def bad(request: worker_pb2.DecodeRequest) -> Script:
        return Script(tokens=[], fail_before=grpc.StatusCode.INVALID_ARGUMENT)

    async def scenario(cluster: FakeCluster, router: RouterServer, ch: grpc.aio.Channel) -> None:
        await cluster.add("d0", WorkerRole.DECODE, script=bad)
        await cluster.add("d1", WorkerRole.DECODE, script=bad)
        await wait_workers(router, "default", 2)
        code, details = await status_of(stub(ch), "hi")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "says no" in details
        total = sum(len(cluster.workers[w].calls.requests) for w in ("d0", "d1"))
        assert total == 1  # not retried

    run(redis_url, namespace, scenario)


# ---- retries and failures ----------------------------------------------------------------------


def test_failure_before_the_first_token_is_retried_once_elsewhere(
    redis_url: str, namespace: str
) -> None:
    def broken(request: worker_pb2.DecodeRequest) -> Script:
        return Script(tokens=[], fail_before=grpc.StatusCode.UNAVAILABLE)

    async def scenario(cluster: FakeCluster, router: RouterServer, ch: grpc.aio.Channel) -> None:
        await cluster.add("p0", WorkerRole.PREFILL)
        await cluster.add("p1", WorkerRole.PREFILL)
        await cluster.add("d0", WorkerRole.DECODE, script=broken)  # first by id: tried first
        await cluster.add("d1", WorkerRole.DECODE)
        await wait_workers(router, "default", 4)
        responses = await generate(stub(ch), "Hello there", max_tokens=8)
        ok_response(responses)
        route = responses[0].route
        assert (route.attempts, route.decode_worker) == (2, "d1")
        # The retry also avoided the first attempt's prefill worker.
        first = cluster.workers["d0"].calls.requests[0].prefill.worker_id
        assert route.prefill_worker not in ("", first)
        assert tokens_of(responses) == list(range(100, 108))
        metrics = router.metrics.metrics.render().decode()
        assert 'pdserve_router_retries_total{pool="default",reason="failed"} 1.0' in metrics

    run(redis_url, namespace, scenario)


def test_second_failure_before_the_first_token_is_unavailable(
    redis_url: str, namespace: str
) -> None:
    def broken(request: worker_pb2.DecodeRequest) -> Script:
        return Script(tokens=[], fail_before=grpc.StatusCode.INTERNAL)

    async def scenario(cluster: FakeCluster, router: RouterServer, ch: grpc.aio.Channel) -> None:
        for name in ("d0", "d1", "d2"):
            await cluster.add(name, WorkerRole.DECODE, script=broken)
        await wait_workers(router, "default", 3)
        code, details = await status_of(stub(ch), "hi")
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "failed before its first token on 2 attempts" in details
        calls = sum(len(w.calls.requests) for w in cluster.workers.values())
        assert calls == 2
        ok_after = await status_of(stub(ch), "again")  # still serving, same answer
        assert ok_after[0] == grpc.StatusCode.UNAVAILABLE

    run(redis_url, namespace, scenario)


class Continuing:
    """A fake model: its ``reply`` to the first prompt it sees, continued from wherever a
    resumed prompt (that prompt + the reply's first k tokens) leaves off."""

    def __init__(self, reply: list[int]) -> None:
        self.reply = reply
        self.prompt_len: int | None = None

    def script(
        self, fail_after: int | None = None, cached: int = 0
    ) -> Callable[[worker_pb2.DecodeRequest], Script]:
        def script(request: worker_pb2.DecodeRequest) -> Script:
            prompt = list(request.token_ids)
            if self.prompt_len is None:
                self.prompt_len = len(prompt)
            done = len(prompt) - self.prompt_len
            assert prompt[self.prompt_len :] == self.reply[:done]  # resumed from what was sent
            return Script(self.reply[done:], fail_after=fail_after, cached_tokens=cached)

        return script


def test_failure_after_the_first_token_ends_the_stream_without_migration(
    redis_url: str, namespace: str
) -> None:
    def breaks(request: worker_pb2.DecodeRequest) -> Script:
        return Script(tokens=list(range(100, 120)), fail_after=3)

    async def scenario(cluster: FakeCluster, router: RouterServer, ch: grpc.aio.Channel) -> None:
        await cluster.add("d0", WorkerRole.DECODE, script=breaks)
        await cluster.add("d1", WorkerRole.DECODE)
        await wait_workers(router, "default", 2)
        received: list[serving_pb2.GenerateResponse] = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for r in stub(ch).Generate(build_request("hi", max_tokens=20), timeout=10):
                received.append(r)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "decode worker d0 failed after 3 tokens" in (err.value.details() or "")
        assert tokens_of(received) == [100, 101, 102]
        assert not cluster.workers["d1"].calls.requests  # never retried mid-stream

    run(redis_url, namespace, scenario, max_migrations=0)


def test_a_broken_stream_migrates_to_another_decode_worker(
    redis_url: str, namespace: str, tok: ModelTokenizer
) -> None:
    reply = list(range(100, 120))
    model = Continuing(reply)

    async def scenario(cluster: FakeCluster, router: RouterServer, ch: grpc.aio.Channel) -> None:
        await cluster.add("d0", WorkerRole.DECODE, script=model.script(fail_after=3))
        await cluster.add("d1", WorkerRole.DECODE, script=model.script(cached=9))
        await wait_workers(router, "default", 2)  # d0 first by id: tried first
        request = build_request("hi", max_tokens=20, ignore_eos=True)
        request.sampling.stop_token_ids.append(7)
        responses = [r async for r in stub(ch).Generate(request, timeout=10)]
        ok_response(responses)
        assert tokens_of(responses) == reply  # nothing missing, nothing twice
        assert text_of(responses) == tok.decode(reply)
        assert responses[0].route.decode_worker == "d0"  # the route stays the first attempt's
        prompt = len(cluster.workers["d0"].calls.requests[0].token_ids)
        (resumed,) = cluster.workers["d1"].calls.requests
        assert list(resumed.token_ids)[prompt:] == reply[:3]
        assert resumed.sampling.max_tokens == 17
        assert list(resumed.sampling.stop_token_ids) == [7] and resumed.sampling.ignore_eos
        usage = responses[-1].usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, 20)
        assert usage.cached_tokens == 0  # the first attempt's; not the resumed prefill's 9
        metrics = router.metrics.metrics.render().decode()
        assert 'migrations_total{cause="worker_died",pool="default"} 1.0' in metrics
        assert 'migration_seconds_count{pool="default"} 1.0' in metrics

    run(redis_url, namespace, scenario)


def test_migration_stops_at_the_limit_or_when_no_worker_is_left(
    redis_url: str, namespace: str
) -> None:
    reply = list(range(100, 120))
    every = Continuing(reply).script(fail_after=3)  # every worker breaks after 3 more tokens

    async def scenario(cluster: FakeCluster, router: RouterServer, ch: grpc.aio.Channel) -> None:
        for name in ("d0", "d1", "d2"):
            await cluster.add(name, WorkerRole.DECODE, script=every)
        await wait_workers(router, "default", 3)
        received: list[serving_pb2.GenerateResponse] = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for r in stub(ch).Generate(build_request("hi", max_tokens=20), timeout=10):
                received.append(r)
        details = err.value.details() or ""
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert tokens_of(received) == reply[:6]  # one migration, then the limit
        assert "failed after 6 tokens were sent" in details
        assert "migration limit reached" in details and "max_migrations 1" in details
        assert sum(len(w.calls.requests) for w in cluster.workers.values()) == 2

    run(redis_url, namespace, scenario, max_migrations=1)


def test_a_stream_that_lost_only_its_finish_reason_is_finished_by_the_router(
    redis_url: str, namespace: str
) -> None:
    def all_but_the_finish(request: worker_pb2.DecodeRequest) -> Script:
        return Script(tokens=list(range(100, 108)), lose_finish=True, cached_tokens=2)

    async def scenario(cluster: FakeCluster, router: RouterServer, ch: grpc.aio.Channel) -> None:
        await cluster.add("d0", WorkerRole.DECODE, script=all_but_the_finish)
        await cluster.add("d1", WorkerRole.DECODE)
        await wait_workers(router, "default", 2)
        responses = await generate(stub(ch), "hi", max_tokens=8)
        ok_response(responses)
        assert tokens_of(responses) == list(range(100, 108))
        assert responses[-1].finish_reason == serving_pb2.FINISH_REASON_LENGTH
        assert responses[-1].usage.completion_tokens == 8
        assert not cluster.workers["d1"].calls.requests  # nothing was left to generate

    run(redis_url, namespace, scenario)


def test_a_stream_with_no_other_decode_worker_cannot_migrate(
    redis_url: str, namespace: str
) -> None:
    async def scenario(cluster: FakeCluster, router: RouterServer, ch: grpc.aio.Channel) -> None:
        breaks = Continuing(list(range(100, 120))).script(fail_after=3)
        await cluster.add("d0", WorkerRole.DECODE, script=breaks)
        await wait_workers(router, "default", 1)
        code, details = await status_of(stub(ch), "hi", max_tokens=20)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "decode worker d0 failed after 3 tokens were sent" in details
        assert "could not be migrated: no other live decode worker" in details

    run(redis_url, namespace, scenario)


def test_crashed_worker_is_quarantined_until_its_registration_expires(
    redis_url: str, namespace: str
) -> None:
    async def scenario(cluster: FakeCluster, router: RouterServer, ch: grpc.aio.Channel) -> None:
        await cluster.add("d0", WorkerRole.DECODE)
        await cluster.add("d1", WorkerRole.DECODE)
        await wait_workers(router, "default", 2)
        await cluster.workers["d0"].kill()  # still registered for up to 1 s
        for i in range(4):
            responses = await generate(stub(ch), f"request {i}", max_tokens=2)
            ok_response(responses)
            assert responses[0].route.decode_worker == "d1"
        assert "d0" in router.tracker.quarantined() or router.view.snapshot("default").num_live == 1

    run(redis_url, namespace, scenario)


# ---- cancellation and deadlines ----------------------------------------------------------------


def slow(request: worker_pb2.DecodeRequest) -> Script:
    return Script(tokens=list(range(100, 200)), delay_s=0.1)


def test_client_cancellation_reaches_the_worker(redis_url: str, namespace: str) -> None:
    async def scenario(cluster: FakeCluster, router: RouterServer, ch: grpc.aio.Channel) -> None:
        await cluster.add("p0", WorkerRole.PREFILL)
        worker = await cluster.add("d0", WorkerRole.DECODE, script=slow)
        await wait_workers(router, "default", 2)
        call = stub(ch).Generate(build_request("hi", max_tokens=100))
        first = await call.read()
        assert first.token_ids == [100]
        assert router.tracker.pending["d0"].requests == 1
        call.cancel()
        await wait_for(lambda: len(worker.calls.cancelled) == 1, 5, "the worker's cancellation")
        await wait_for(lambda: router.tracker.pending["d0"].requests == 0, 5, "ticket closed")
        assert not worker.calls.completed
        metrics = router.metrics.metrics.render().decode()
        assert 'status="CANCELLED"' in metrics

    run(redis_url, namespace, scenario)


def test_deadline_is_propagated(redis_url: str, namespace: str) -> None:
    async def scenario(cluster: FakeCluster, router: RouterServer, ch: grpc.aio.Channel) -> None:
        worker = await cluster.add("d0", WorkerRole.DECODE, script=slow)
        await wait_workers(router, "default", 1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(stub(ch), "hi", max_tokens=100, timeout_s=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_for(lambda: len(worker.calls.cancelled) == 1, 5, "the worker's cancellation")

    run(redis_url, namespace, scenario)


# ---- text ------------------------------------------------------------------------------------


def test_streamed_text_is_valid_utf8_and_stop_strings_cut_it(
    redis_url: str, namespace: str, tok: ModelTokenizer
) -> None:
    reply = "Voilà 🎉 naïve 日本 done. END and more text after the stop"
    ids = tok.encode(reply)

    def speak(request: worker_pb2.DecodeRequest) -> Script:
        return Script(tokens=ids, delay_s=0.01, finish=worker_pb2.FINISH_REASON_STOP)

    async def scenario(cluster: FakeCluster, router: RouterServer, ch: grpc.aio.Channel) -> None:
        worker = await cluster.add("c0", WorkerRole.COLOCATED, script=speak)
        await wait_workers(router, "default", 1)
        full = await generate(stub(ch), "hi", max_tokens=200)
        ok_response(full)
        assert text_of(full) == reply and tokens_of(full) == ids
        assert all("\ufffd" not in r.text for r in full)
        assert full[-1].finish_reason == serving_pb2.FINISH_REASON_STOP
        assert full[-1].usage.completion_tokens == len(ids)
        assert full[0].route.prefill_worker == "" and full[0].route.decode_worker == "c0"

        cut = await generate(stub(ch), "hi", max_tokens=200, stop=["END", "zzz"])
        assert text_of(cut) == "Voilà 🎉 naïve 日本 done. "
        assert cut[-1].finish_reason == serving_pb2.FINISH_REASON_STOP
        assert cut[-1].usage.completion_tokens < len(ids)
        await wait_for(lambda: len(worker.calls.cancelled) == 1, 5, "worker call cancelled")

        short = await generate(stub(ch), "hi", max_tokens=3)
        assert short[-1].finish_reason == serving_pb2.FINISH_REASON_LENGTH
        assert tokens_of(short) == ids[:3]

    run(redis_url, namespace, scenario)


def test_sampling_reaches_the_worker(redis_url: str, namespace: str) -> None:
    async def scenario(cluster: FakeCluster, router: RouterServer, ch: grpc.aio.Channel) -> None:
        worker = await cluster.add("d0", WorkerRole.DECODE)
        await wait_workers(router, "default", 1)
        await generate(
            stub(ch),
            "hi",
            max_tokens=5,
            temperature=0.5,
            top_p=0.9,
            top_k=7,
            seed=42,
            ignore_eos=True,
        )
        await generate(stub(ch), token_ids=[1, 2, 3])
        first, second = worker.calls.requests
        s = first.sampling
        assert (s.max_tokens, s.top_k, s.seed, s.ignore_eos) == (5, 7, 42, True)
        assert s.temperature == pytest.approx(0.5) and s.top_p == pytest.approx(0.9)
        assert list(second.token_ids) == [1, 2, 3]
        assert second.sampling.max_tokens == 256 and not second.sampling.HasField("seed")
        assert not second.HasField("prefill")  # decode-only pool: local prefill

    run(redis_url, namespace, scenario)


# ---- prefix-aware routing ---------------------------------------------------------------------


def test_shared_prefixes_stick_and_new_prefixes_spread(redis_url: str, namespace: str) -> None:
    async def scenario(cluster: FakeCluster, router: RouterServer, ch: grpc.aio.Channel) -> None:
        await cluster.add("p0", WorkerRole.PREFILL)
        await cluster.add("p1", WorkerRole.PREFILL)
        await cluster.add("d0", WorkerRole.DECODE)
        await wait_workers(router, "default", 3)
        client = stub(ch)

        async def prefill_of(system: str, user: str) -> serving_pb2.Route:
            responses = await generate(
                client, messages=[("system", system), ("user", user)], max_tokens=2
            )
            return responses[0].route

        first = await prefill_of(SYSTEM, "question one")
        assert first.predicted_cached_tokens == 0
        # Before any event arrived, the prediction already steers the second request.
        second = await prefill_of(SYSTEM, "question two")
        assert second.prefill_worker == first.prefill_worker
        assert second.predicted_cached_tokens >= 128
        # New prefixes alternate between the two (equal cost, fewest routed first).
        spread = [(await prefill_of(f"Persona {i}. " * 30, "hi")).prefill_worker for i in range(4)]
        assert set(spread) == {"p0", "p1"}
        # The events (not just predictions) made it into the index.
        holder = first.prefill_worker
        await wait_for(lambda: router.follower.applied > 0, 5, "KV events")
        prompt = list(cluster.workers["d0"].calls.requests[0].token_ids)
        held = router.indexes["default"].match(block_hashes(prompt, BLOCK_SIZE))
        assert held.get(holder, 0) >= 8

        # A second router started now replays the stream and agrees on the holder.
        other = await start_router(router.config.redis_url or "", router.config.namespace)
        try:
            await wait_workers(other, "default", 3)
            await wait_for(lambda: other.follower.applied >= router.follower.applied, 5)
            async with grpc.aio.insecure_channel(other.address) as ch2:
                responses = await generate(
                    stub(ch2),
                    messages=[("system", SYSTEM), ("user", "question three")],
                    max_tokens=2,
                )
                assert responses[0].route.prefill_worker == holder
                assert responses[0].route.predicted_cached_tokens >= 128
                models = await stub(ch2).ListModels(serving_pb2.ListModelsRequest())
                mine = await client.ListModels(serving_pb2.ListModelsRequest())
                assert models == mine
                (card,) = models.models
                assert (card.pool, card.prefill_workers, card.decode_workers) == ("default", 2, 1)
                assert card.name == "SmolLM2-135M-Instruct" and card.context_length == 8192
                assert card.is_default
        finally:
            await other.stop(grace_s=0)

    run(redis_url, namespace, scenario)


def test_comparison_policies_are_selectable_per_pool(redis_url: str, namespace: str) -> None:
    async def scenario(cluster: FakeCluster, router: RouterServer, ch: grpc.aio.Channel) -> None:
        for pool in ("rr", "rand", "least"):
            await cluster.add(f"{pool}-p0", WorkerRole.PREFILL, pool)
            await cluster.add(f"{pool}-p1", WorkerRole.PREFILL, pool)
            await cluster.add(f"{pool}-d0", WorkerRole.DECODE, pool)
            await wait_workers(router, pool, 3)
        client = stub(ch)
        for pool in ("rr", "rand", "least"):
            routes = [
                (await generate(client, SYSTEM, model=pool, max_tokens=1))[0].route
                for _ in range(16)
            ]
            assert {r.policy for r in routes} == {
                "rr": {"round_robin"},
                "rand": {"random"},
                "least": {"least_loaded"},
            }[pool]
            # None of them follows the prefix, so the same prompt visits both workers.
            assert {r.prefill_worker for r in routes} == {f"{pool}-p0", f"{pool}-p1"}

    pools = [
        {"name": "rr", "policy": "round_robin"},
        {"name": "rand", "policy": "random"},
        {"name": "least", "policy": "least_loaded"},
    ]
    run(redis_url, namespace, scenario, pools=pools)


# ---- health, reflection -----------------------------------------------------------------------


def test_health_and_reflection_serve_grpcurl(redis_url: str, namespace: str) -> None:
    async def scenario(cluster: FakeCluster, router: RouterServer, ch: grpc.aio.Channel) -> None:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "pdserve.v1.Generation"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="pdserve.v1.Generation"),
        ]
        replies = [r async for r in reflect.ServerReflectionInfo(iter(requests))]
        names = {s.name for s in replies[0].list_services_response.service}
        assert "pdserve.v1.Generation" in names and "grpc.health.v1.Health" in names
        assert replies[1].file_descriptor_response.file_descriptor_proto  # grpcurl describe

    run(redis_url, namespace, scenario)


# ---- the CLI client -------------------------------------------------------------------------


def test_cli_client_prints_the_stream_and_errors(
    redis_url: str, namespace: str, tok: ModelTokenizer
) -> None:
    reply = "Bonjour 🎉 tout le monde"

    def speak(request: worker_pb2.DecodeRequest) -> Script:
        return Script(tokens=tok.encode(reply), finish=worker_pb2.FINISH_REASON_STOP)

    async def scenario(cluster: FakeCluster, router: RouterServer, ch: grpc.aio.Channel) -> None:
        await cluster.add("c0", WorkerRole.COLOCATED, script=speak)
        await wait_workers(router, "default", 1)
        out, err = io.StringIO(), io.StringIO()
        code = await asyncio.to_thread(
            router_client.run, router.address, "Say hi", out=out, err=err, max_tokens=32
        )
        assert code == 0 and out.getvalue() == reply + "\n"
        assert "finish=stop" in err.getvalue() and "pool=default local→c0" in err.getvalue()
        out, err = io.StringIO(), io.StringIO()
        code = await asyncio.to_thread(
            router_client.run, router.address, "Say hi", out=out, err=err, model="nope"
        )
        assert code == 1 and err.getvalue().startswith("error: NOT_FOUND: unknown model")
        cards = await asyncio.to_thread(router_client.list_models, router.address)
        assert [(c.pool, c.decode_workers) for c in cards] == [("default", 1)]
        request = cluster.workers["c0"].calls.requests[0]
        assert tok.decode(list(request.token_ids)).endswith("Say hi\nassistant\n")

    run(redis_url, namespace, scenario)
