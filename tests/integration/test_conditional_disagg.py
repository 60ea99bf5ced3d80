"""Conditional disaggregation with real workers: 1 prefill + 1 decode, the real model.

The pool has ``conditional`` thresholds, so the router prefills short prompts, and prompts
the decode worker already holds, on the decode worker; a long uncached prompt goes to the
prefill worker. The first response's route says which way it went, the output equals the
single-process engine's (greedy), the decode worker publishes its prefix cache's events,
and the router counts the decisions.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from common.registry import Registry
from engine import LLM, SamplingParams
from tests.integration.router_helpers import (
    generate,
    run_bounded,
    start_router,
    stub,
    tokens_of,
    wait_for,
    wait_workers,
)
from tests.integration.workers_harness import SMALL_ENGINE, WorkerProcess, start_workers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MAX_TOKENS = 8
SHORT = "The capital of France is"
LONG = (
    "The lighthouse keeper kept a careful log of every ship that passed the rocky point, "
    "noting the weather, the state of the sea, the colour of the sky at dawn and at dusk, "
    "and any signal lamps he saw on the horizon during the long winter nights. "
) * 4  # ~200 tokens: over the 64-token local threshold
CONDITIONAL = {
    "local_max_uncached_tokens": 64,
    "local_when_prefill_queue_tokens_over": 100_000,
    "max_decode_running_for_local": 8,
}


@pytest.fixture(scope="module")
def workers(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ...]]:
    namespace = f"cond-{uuid.uuid4().hex[:6]}"
    common = ["--redis-url", redis_url, "--namespace", namespace, *SMALL_ENGINE]
    specs = [
        ("prefill_worker", "cond-prefill", common),
        ("decode_worker", "cond-decode", [*common, "--on-prefill-failure", "fail"]),
    ]
    started: list[WorkerProcess] = start_workers(specs, Path(tmp_path_factory.mktemp("cond")))
    try:
        yield namespace, started[0].worker_id, started[1].worker_id
    finally:
        for worker in started:
            worker.kill()


def reference(llm: LLM, prompt: str) -> list[int]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    return llm.generate([prompt], params)[0].token_ids


def test_short_and_cached_prompts_prefill_locally(
    workers: tuple[str, str, str], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    namespace, prefill_id, decode_id = workers
    caplog.set_level(logging.DEBUG, logger="router.generation")
    llm = LLM(dtype="float32", num_kv_blocks=256, num_threads=1)  # = SMALL_ENGINE's dtype
    expected = {p: reference(llm, p) for p in (SHORT, LONG)}

    async def main() -> None:
        router = await start_router(
            redis_url, namespace, pools=[{"name": "default", "conditional": CONDITIONAL}]
        )
        try:
            await wait_workers(router, "default", 2)
            async with grpc.aio.insecure_channel(router.address) as channel:
                client = stub(channel)

                async def run(prompt: str) -> tuple[str, str, int, list[int]]:
                    """(prefill mode, prefill worker, cached tokens, output tokens)"""
                    replies = await generate(client, prompt, max_tokens=MAX_TOKENS)
                    route, cached = replies[0].route, replies[-1].usage.cached_tokens
                    return route.prefill_mode, route.prefill_worker, cached, tokens_of(replies)

                mode, by, _, tokens = await run(SHORT)
                assert (mode, by, tokens) == ("local", "", expected[SHORT])

                mode, by, _, tokens = await run(LONG)
                assert (mode, by, tokens) == ("remote", prefill_id, expected[LONG])

                # The landed blocks are in the decode worker's prefix cache: the same long
                # prompt now prefills there, reusing them.
                mode, by, cached, tokens = await run(LONG)
                assert (mode, by, tokens) == ("local", "", expected[LONG])
                assert cached >= 160, cached

            # The decode worker publishes its KV events (its landed and computed blocks).
            async with Registry(redis_url, namespace) as registry:
                seen: set[str] = set()

                async def decode_published() -> bool:
                    records = await registry.read_kv_events({"default": "0"}, None, 10_000)
                    seen.update(r.worker_id for r in records)
                    return decode_id in seen

                for _ in range(100):
                    if await decode_published():
                        break
                    await asyncio.sleep(0.1)
                assert decode_id in seen and prefill_id in seen, seen

            def count(mode: str, reason: str) -> float:
                value = router.metrics.metrics.registry.get_sample_value(
                    "pdserve_router_prefill_decisions_total",
                    {"pool": "default", "mode": mode, "reason": reason},
                )
                return value or 0.0

            await wait_for(lambda: count("local", "short") == 1, 2, "decisions counted")
            assert count("remote", "long") == 1 and count("local", "cached") == 1
        finally:
            await router.stop()

    run_bounded(main(), 120)
    # Each decision is logged with its inputs.
    lines = [r.getMessage() for r in caplog.records if "prefill_mode=" in r.getMessage()]
    assert len(lines) == 3, lines
    assert "prefill_mode=local reason=short" in lines[0]
    assert "prefill_mode=remote reason=long" in lines[1]
    assert "prefill_mode=local reason=cached" in lines[2] and "prefill_queue_tokens=" in lines[2]
