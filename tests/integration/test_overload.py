"""Overload control against real workers: bounded queues, fast refusals, default deadline.

One prefill worker and two decode workers (real processes, the real model, real Redis),
each with 2 active slots and an admission queue of 2 (shared by the tests); each test runs
one router in this process:

1. Worker bounds (the router's own is wide): a burst of several times what the workers
   hold. Refusals are RESOURCE_EXHAUSTED with ``retry-after-ms`` trailing metadata,
   answered fast (the router tried the other decode worker first); admitted requests
   complete with the text of an unloaded run.
2. The router's pool bound (2 in flight, 2 queued): a gRPC burst is refused by the router
   itself; an HTTP burst gets 429 with ``Retry-After`` and an OpenAI-shaped error body.
3. A default deadline: a request that sets none ends with DEADLINE_EXCEEDED (HTTP: 504).

Afterwards every worker reports no used KV block and nothing queued (GetStatus).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import pytest

from common.errors import RETRY_AFTER_METADATA
from router.client import build_request
from router.server import RouterServer
from tests.integration.router_helpers import run_bounded, start_router, stub, wait_for
from tests.integration.workers_harness import (
    SMALL_ENGINE,
    WorkerProcess,
    metric,
    start_workers,
    wait_idle,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

MAX_TOKENS = 12
PROMPTS = [f"Note {i}: the quick brown fox jumps over the lazy dog and then" for i in range(4)]
BOUNDS = ("--max-active-requests", "2", "--admission-queue-size", "2")
# fp32: greedy tokens do not depend on the batch a request shares (bf16 rounding can)
FP32 = ("--dtype", "float32")
BURST = 24  # 3x what the two decode workers hold (2 x (2 active + 2 queued))
PROBES = 4


@pytest.fixture(scope="module")
def workers(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    namespace = f"overload-{uuid.uuid4().hex[:6]}"
    log_dir = tmp_path_factory.mktemp("overload")
    common = ["--redis-url", redis_url, "--namespace", namespace, *SMALL_ENGINE, *BOUNDS, *FP32]
    specs = [("prefill_worker", "prefill-1", common)]
    specs += [("decode_worker", name, common) for name in ("decode-1", "decode-2")]
    started: list[WorkerProcess] = []
    try:
        started = start_workers(specs, log_dir)
        yield {"namespace": namespace, "list": started}
    finally:
        for worker in started:
            worker.kill()


@dataclass
class Outcome:
    tokens: list[int]
    code: grpc.StatusCode
    details: str
    retry_after_ms: int | None
    seconds: float
    finished_at: float = 0.0  # time.perf_counter()


async def call(client, prompt: str, timeout_s: float | None = 60.0, **options) -> Outcome:
    options.setdefault("max_tokens", MAX_TOKENS)
    request = build_request(prompt, ignore_eos=True, **options)
    tokens: list[int] = []
    started = time.perf_counter()
    try:
        async for response in client.Generate(request, timeout=timeout_s):
            tokens.extend(response.token_ids)
    except grpc.aio.AioRpcError as exc:
        trailing = dict(exc.trailing_metadata() or ())
        hint = trailing.get(RETRY_AFTER_METADATA)
        return Outcome(
            tokens,
            exc.code(),
            exc.details() or "",
            int(hint) if hint is not None else None,
            time.perf_counter() - started,
        )
    now = time.perf_counter()
    return Outcome(tokens, grpc.StatusCode.OK, "", None, now - started, now)


async def burst(client, count: int) -> list[Outcome]:
    """``count`` concurrent requests, plus probes sent one at a time once the burst has
    filled the queues (the first refusals are back): each probe's latency is a refusal's
    alone, not shared with the burst's arrival on this process's event loop."""
    calls = [asyncio.create_task(call(client, PROMPTS[i % len(PROMPTS)])) for i in range(count)]
    await wait_for(lambda: sum(c.done() for c in calls) >= 2, 30, "the first refusals")
    probes = [await call(client, PROMPTS[0]) for _ in range(PROBES)]
    return [*await asyncio.gather(*calls), *probes]


def check_refusals(outcomes: list[Outcome], overloaded: str, p50_s: float) -> list[Outcome]:
    """Every refusal is RESOURCE_EXHAUSTED with a hint; the probes' refusals were fast
    (median under ``p50_s``). Returns the admitted requests."""
    refused = [o for o in outcomes if o.code != grpc.StatusCode.OK]
    assert refused, "nothing was refused"
    for outcome in refused:
        assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
        assert outcome.retry_after_ms is not None and outcome.retry_after_ms > 0, outcome
        assert overloaded in outcome.details, outcome.details
        assert not outcome.tokens
    probes = [o.seconds for o in outcomes[-PROBES:] if o.code != grpc.StatusCode.OK]
    p50, worst = statistics.median(probes) * 1000, max(probes) * 1000
    print(f"refused {len(refused)} of {len(outcomes)}; lone refusals {p50:.1f} / {worst:.1f} ms")
    assert len(probes) >= 2, outcomes[-PROBES:]  # the workers were still full
    assert statistics.median(probes) < p50_s, probes  # no model work on the way
    assert max(o.seconds for o in refused) < 1.0, refused
    return [o for o in outcomes if o.code == grpc.StatusCode.OK]


def run_scenario(redis_url: str, workers: dict, scenario, **config) -> None:
    """Run ``scenario(router)`` on a router of ``config``; then no worker holds a block."""

    async def main() -> None:
        router = await start_router(redis_url, workers["namespace"], **config)
        try:
            await wait_for(lambda: router.view.snapshot("default").num_live == 3, 20, "workers")
            await scenario(router)
        finally:
            await router.stop(grace_s=0)

    run_bounded(main(), timeout_s=90)
    for worker in workers["list"]:
        with grpc.insecure_channel(worker.grpc_address) as channel:
            final = wait_idle(channel)
        assert final.used_blocks == 0 and final.waiting == 0, (worker.name, final)


def test_full_workers_refuse_fast_and_admitted_requests_complete(
    redis_url: str, workers: dict
) -> None:
    decoders = [w for w in workers["list"] if w.name.startswith("decode")]
    run_scenario(redis_url, workers, lambda r: worker_bounds(r, decoders), http_port=None)


def test_a_full_pool_queue_refuses_on_grpc_and_http(redis_url: str, workers: dict) -> None:
    pools = [{"name": "default", "max_in_flight": 2, "max_queued": 2}]
    run_scenario(redis_url, workers, router_bounds, pools=pools)


def test_the_default_deadline_ends_requests_that_set_none(redis_url: str, workers: dict) -> None:
    run_scenario(redis_url, workers, default_deadline, default_deadline_s=0.4)


async def worker_bounds(router: RouterServer, decoders: list[WorkerProcess]) -> None:
    async with grpc.aio.insecure_channel(router.address) as channel:
        client = stub(channel)
        reference = {p: (await call(client, p)).tokens for p in PROMPTS}
        assert all(len(t) == MAX_TOKENS for t in reference.values()), reference
        outcomes = await burst(client, BURST)
    # Two worker round trips; on two cores the busy workers' engine threads compete with
    # the decode workers' event loops (quiet: ~4 ms; with the suite's neighbours: ~30 ms).
    admitted = check_refusals(outcomes, "every worker of pool 'default' refused", 0.1)
    assert len(admitted) >= 4, outcomes
    for i, outcome in enumerate(outcomes):
        if outcome.code == grpc.StatusCode.OK:
            assert outcome.tokens == reference[PROMPTS[i % len(PROMPTS) if i < BURST else 0]]
    refused = len(outcomes) - len(admitted)
    rendered = router.metrics.metrics.render().decode()
    line = f'router_rejections_total{{pool="default",reason="workers_full"}} {refused}.0'
    assert line in rendered
    full = sum(
        metric(w, 'pdserve_admission_rejections_total{reason="queue_full"}') for w in decoders
    )
    assert full >= refused, full  # each refused request was refused by both


async def router_bounds(router: RouterServer) -> None:
    async with grpc.aio.insecure_channel(router.address) as channel:
        outcomes = await burst(stub(channel), 10)
        full = "pool 'default' is overloaded: its admission queue is full"
        admitted = check_refusals(outcomes, full, 0.05)  # in the router: no worker call
        assert len(admitted) >= 4, outcomes
        await priority_first(router, stub(channel))

    body = {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "ignore_eos": True, "priority": 1}
    async with httpx.AsyncClient(base_url=f"http://{router.http_address}", timeout=60) as http:
        replies = await asyncio.gather(
            *(
                http.post("/v1/completions", json=body, headers={"X-Client-Id": f"c{i % 3}"})
                for i in range(10)
            )
        )
    statuses = sorted(r.status_code for r in replies)
    assert 200 in statuses and 429 in statuses, statuses
    for reply in replies:
        if reply.status_code == 429:
            assert int(reply.headers["Retry-After"]) >= 1
            assert int(reply.headers["retry-after-ms"]) > 0
            error = reply.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
            assert "overloaded" in error["message"]
        else:
            assert reply.status_code == 200, reply.text
    rendered = router.metrics.metrics.render().decode()
    assert 'router_rejections_total{pool="default",reason="queue_full"}' in rendered


async def priority_first(router: RouterServer, client) -> None:
    """With both slots busy, a high-priority request queued after a normal one starts first."""
    gate = router.generator.admission.gate("default")
    # one slot frees well before the other: only one queued request can take it
    busy = [
        asyncio.create_task(call(client, PROMPTS[i], max_tokens=n)) for i, n in ((0, 8), (1, 64))
    ]
    await wait_for(lambda: gate.active == 2, 20, "both slots busy")
    normal = asyncio.create_task(call(client, PROMPTS[2]))
    await wait_for(lambda: gate.queued == 1, 20, "the normal request queued")
    high = asyncio.create_task(call(client, PROMPTS[3], priority=1))
    await wait_for(lambda: gate.queued == 2, 20, "the high-priority request queued")
    done = await asyncio.gather(*busy, normal, high)
    assert all(o.code == grpc.StatusCode.OK for o in done), done
    assert done[3].finished_at < done[2].finished_at


async def default_deadline(router: RouterServer) -> None:
    async with grpc.aio.insecure_channel(router.address) as channel:
        request = build_request(PROMPTS[1], max_tokens=400, ignore_eos=True)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub(channel).Generate(request):  # no client deadline
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
        assert time.monotonic() - started < 5
    body = {"prompt": PROMPTS[1], "max_tokens": 400, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=f"http://{router.http_address}", timeout=30) as http:
        reply = await http.post("/v1/completions", json=body)
    assert reply.status_code == 504, reply.text
    assert reply.json()["error"]["type"] == "timeout_error"
