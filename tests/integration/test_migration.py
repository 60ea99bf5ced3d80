"""Request migration against real workers: kill -9 a decode worker mid-stream.

One prefill worker and three decode workers (real processes, the real model, real Redis),
one router in this process (``max_migrations: 1``). The router's quarantine steers streams
onto the decode worker the test means to kill: a quarantined worker is avoided while
another is live, and the test lifts it (``WorkerTracker.release``) once its streams run.

1. 8 greedy streams on decode-1, decode-1 killed mid-stream: every stream migrates to
   decode-2 and completes with the text of an uninterrupted run (the same router, before).
2. A long stream on decode-3, which drains (SIGTERM, 0.5 s grace) and cuts it: it migrates
   to decode-2; then decode-2 is killed too: past the limit, UNAVAILABLE naming the worker,
   the tokens sent and the limit.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator

import grpc
import pytest

from proto import serving_pb2
from router.client import build_request
from router.server import RouterServer
from tests.integration.router_helpers import run_bounded, start_router, stub, wait_for
from tests.integration.workers_harness import SMALL_ENGINE, WorkerProcess, start_workers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MAX_TOKENS = 48
PROMPTS = [
    f"Story {i}: the lighthouse keeper counted the ships that passed the harbour, and"
    for i in range(8)
]
DECODERS = ("decode-1", "decode-2", "decode-3")


@pytest.fixture(scope="module")
def workers(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    namespace = f"migrate-{uuid.uuid4().hex[:6]}"
    log_dir = tmp_path_factory.mktemp("migration")
    common = ["--redis-url", redis_url, "--namespace", namespace, *SMALL_ENGINE]
    specs = [("prefill_worker", "prefill-1", common)]
    specs += [("decode_worker", name, common) for name in DECODERS[:2]]
    specs += [("decode_worker", "decode-3", [*common, "--drain-grace", "0.5"])]
    started: list[WorkerProcess] = []
    try:
        started = start_workers(specs, log_dir)
        yield {"namespace": namespace, "log_dir": log_dir, **{w.name: w for w in started}}
    finally:
        for worker in started:
            worker.kill()


class Stream:
    """One client stream, collected as it arrives."""

    def __init__(self, client, prompt: str, max_tokens: int = MAX_TOKENS) -> None:
        request = build_request(prompt, max_tokens=max_tokens, ignore_eos=True)
        self.responses: list[serving_pb2.GenerateResponse] = []
        self.task = asyncio.create_task(self._run(client, request))

    async def _run(self, client, request: serving_pb2.GenerateRequest) -> None:
        async for response in client.Generate(request, timeout=120):
            self.responses.append(response)

    @property
    def tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.responses)

    @property
    def text(self) -> str:
        return "".join(r.text for r in self.responses)


def only_on(router: RouterServer, worker_id: str) -> None:
    """Route new streams to ``worker_id``: quarantine the other decode workers."""
    router.tracker.release(worker_id)
    for other in DECODERS:
        if other != worker_id:
            router.tracker.quarantine(other)


async def kill_when(
    router: RouterServer,
    streams: list[Stream],
    at_least: int,
    worker: WorkerProcess,
    to: str,
    how: signal.Signals = signal.SIGKILL,
) -> None:
    """Once every stream has ``at_least`` tokens, open ``to`` and signal ``worker``."""
    await wait_for(lambda: all(s.tokens >= at_least for s in streams), 60, f"{at_least} tokens")
    router.tracker.release(to)
    worker.signal(how)


def test_streams_survive_their_decode_worker_and_stop_at_the_limit(
    redis_url: str, workers: dict
) -> None:
    async def main() -> None:
        router = await start_router(
            redis_url, workers["namespace"], max_migrations=1, quarantine_s=120.0
        )
        try:
            await wait_for(lambda: router.view.snapshot("default").num_live == 4, 20, "workers")
            async with grpc.aio.insecure_channel(router.address) as channel:
                await scenario(router, stub(channel))
        finally:
            await router.stop(grace_s=0)

    async def scenario(router: RouterServer, client) -> None:
        # The uninterrupted run, through the same router and workers.
        only_on(router, "decode-1")
        reference = [Stream(client, p) for p in PROMPTS]
        await asyncio.gather(*(s.task for s in reference))

        # 1. Kill decode-1 under 8 streams: all of them move to decode-2 and complete.
        streams = [Stream(client, p) for p in PROMPTS]
        await kill_when(router, streams, 4, workers["decode-1"], to="decode-2")
        at_kill = [s.tokens for s in streams]
        await asyncio.gather(*(s.task for s in streams))
        assert all(t < MAX_TOKENS for t in at_kill), at_kill  # the kill landed mid-stream
        for stream, want in zip(streams, reference, strict=True):
            first, last = stream.responses[0], stream.responses[-1]
            assert first.route.decode_worker == "decode-1"  # the route stays the first's
            assert stream.text == want.text
            assert [t for r in stream.responses for t in r.token_ids] == [
                t for r in want.responses for t in r.token_ids
            ]
            assert last.finish_reason == serving_pb2.FINISH_REASON_LENGTH
            assert sum(r.finish_reason != 0 for r in stream.responses) == 1
            assert last.usage.prompt_tokens == want.responses[-1].usage.prompt_tokens
            assert last.usage.completion_tokens == MAX_TOKENS
        metrics = router.metrics.metrics.render().decode()
        assert 'migrations_total{cause="worker_died",pool="default"} 8.0' in metrics
        assert 'migration_seconds_count{pool="default"} 8.0' in metrics

        # 2. A drain cuts a stream (it moves), then a kill breaks it again: past the limit.
        only_on(router, "decode-3")
        stream = Stream(client, "Count the waves: one, two,", max_tokens=200)
        await kill_when(router, [stream], 4, workers["decode-3"], "decode-2", signal.SIGTERM)
        assert stream.responses[0].route.decode_worker == "decode-3"
        await wait_for(lambda: "drained" in router.metrics.metrics.render().decode(), 60)
        assert not stream.task.done()
        await kill_when(router, [stream], stream.tokens + 4, workers["decode-2"], to="decode-2")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream.task
        details = err.value.details() or ""
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"decode worker decode-2 failed after {stream.tokens} tokens were sent" in details
        assert "migration limit reached" in details and "max_migrations 1" in details
        metrics = router.metrics.metrics.render().decode()
        assert 'migrations_total{cause="drained",pool="default"} 1.0' in metrics

    run_bounded(main(), timeout_s=150)
