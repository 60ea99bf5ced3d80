"""The decode and prefill request lifecycles in one process: real model and engines, the
fake KV transport, the Prefill RPC replaced by a direct call.

Both apps are built by their role's wiring function, as in a worker process, with the
fakes injected: ``FakeNetwork`` for the KV transport, ``FakePrefillClient`` for the
Prefill call. Deterministic where the process tests cannot be: whole and layer-wise
sends, a cancellation in each queue (prealloc, transfer, running), transfer failures
injected mid-way, admission order and deadlines. Every test ends with both engines
holding no referenced block.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from common.errors import ErrorCode, RequestError
from common.launch import wait_until_async
from common.metrics import Metrics
from common.worker_info import WorkerRole
from decode_worker.decode import Decoder
from decode_worker.prefill_client import PrefillFailed
from decode_worker.prefill_fake import FakePrefillClient
from decode_worker.wiring import build_decode_app
from decode_worker.worker import DecodeApp
from engine import LLM, SamplingParams
from engine.async_engine import AsyncEngine
from engine.llm_engine import LLMEngine
from kv_transfer.errors import PeerLost
from kv_transfer.fake import FakeNetwork
from kv_transfer.types import PeerAddress, TransferConfig
from messages.decode import DecodeJob, PrefillTarget, TokenDelta
from messages.prefill import PrefillJob
from prefill_worker.prefill import Prefiller
from prefill_worker.wiring import build_prefill_app
from prefill_worker.worker import PrefillApp
from worker.config import PrefillFailurePolicy, WorkerConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(200 + 13 * i, 230 + 29 * i)) for i in range(6)]  # 30-175 tokens
TARGET = PrefillTarget("prefill-0", "in-process")
TRANSFER = TransferConfig(timeout_s=10.0, chunk_bytes=256 << 10, poll_interval_s=0.005)


@dataclass
class Engines:
    decode: LLMEngine
    prefill: LLMEngine
    expected: list[list[int]]


@pytest.fixture(scope="module")
def engines() -> Engines:
    # fp32: the expected tokens come from a batched run, the workers' from solo and
    # recomputed prefills; only fp32 is batch-invariant (bf16 is checked elsewhere).
    reference = LLM(dtype="float32", num_kv_blocks=64, num_threads=1)
    expected = [o.token_ids for o in reference.generate(PROMPTS, GREEDY)]
    # The reference engine, now idle, serves as the decode side.
    prefill = LLM(dtype="float32", num_kv_blocks=64, num_threads=1)
    return Engines(reference.engine, prefill.engine, expected)


@dataclass
class Rig:
    decode: DecodeApp
    prefill: PrefillApp
    client: FakePrefillClient
    network: FakeNetwork

    @property
    def decoder(self) -> Decoder:
        return self.decode.decoder

    @property
    def prefiller(self) -> Prefiller:
        return self.prefill.prefiller

    @property
    def decode_engine(self) -> AsyncEngine:
        return self.decode.engine

    @property
    def prefill_engine(self) -> AsyncEngine:
        return self.prefill.engine

    @property
    def receiver_address(self) -> PeerAddress:
        assert self.decode.receiver is not None
        return self.decode.receiver.address

    async def used(self) -> tuple[int, int]:
        return (
            await self.decode_engine.call(lambda e: e.block_manager.num_used_blocks),
            await self.prefill_engine.call(lambda e: e.block_manager.num_used_blocks),
        )

    async def assert_no_blocks_held(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while (used := await self.used()) != (0, 0):
            assert time.monotonic() < deadline, f"blocks still used (decode, prefill): {used}"
            await asyncio.sleep(0.02)
        assert self.decoder.active == 0 and self.prefiller.active == 0
        assert self.prefill.sends.tracked == 0


@contextlib.asynccontextmanager
async def rig(
    engines: Engines,
    *,
    layer_wise: bool = True,
    policy: PrefillFailurePolicy = PrefillFailurePolicy.LOCAL,
    chunk_delay_s: float = 0.0,
    prefill_timeout_s: float = 10.0,
) -> AsyncIterator[Rig]:
    network = FakeNetwork(chunk_delay_s)
    prefill = build_prefill_app(
        WorkerConfig(role=WorkerRole.PREFILL, kv_transfer=TRANSFER),
        "prefill-0",
        Metrics(),
        engine=engines.prefill,
        make_sender=network.sender,
    )
    client = FakePrefillClient(prefill.prefiller.run)
    decode_config = WorkerConfig(
        role=WorkerRole.DECODE,
        prefill_timeout_s=prefill_timeout_s,
        on_prefill_failure=policy,
        layer_wise=layer_wise,
        kv_transfer=TRANSFER,
    )
    decode = build_decode_app(
        decode_config,
        "decode-0",
        Metrics(),
        engine=engines.decode,
        make_receiver=network.receiver,
        prefill=client,
    )
    try:
        yield Rig(decode, prefill, client, network)
    finally:
        await decode.close()
        await prefill.close()


def job(i: int, prefill: PrefillTarget | None = TARGET, **kwargs: object) -> DecodeJob:
    return DecodeJob(f"r{i}", tuple(PROMPTS[i]), GREEDY, prefill, **kwargs)  # type: ignore[arg-type]


async def collect(decoder: Decoder, j: DecodeJob) -> list[TokenDelta]:
    return [delta async for delta in decoder.run(j)]


def tokens(deltas: list[TokenDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


async def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    await wait_until_async(predicate, timeout_s, what, poll_s=0.002)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


@pytest.mark.parametrize("layer_wise", [False, True], ids=["whole", "layer-wise"])
def test_disaggregated_matches_single_engine(engines: Engines, layer_wise: bool) -> None:
    async def scenario() -> None:
        async with rig(engines, layer_wise=layer_wise) as r:
            results = await asyncio.gather(
                *(collect(r.decoder, job(i)) for i in range(len(PROMPTS)))
            )
            assert [tokens(d) for d in results] == engines.expected
            for deltas, prompt in zip(results, PROMPTS, strict=True):
                assert deltas[0].prefilled_by == "prefill-0" and len(deltas[0].token_ids) == 1
                last = deltas[-1]
                assert last.finish_reason is not None and last.usage is not None
                assert last.usage.prompt_tokens == len(prompt)
                assert last.usage.completion_tokens == GREEDY.max_tokens
            await r.assert_no_blocks_held()

    run(scenario)


def test_cancel_in_each_queue_frees_both_sides(engines: Engines) -> None:
    async def cancel_when(r: Rig, i: int, ready: Callable[[], bool], what: str) -> None:
        task = asyncio.ensure_future(collect(r.decoder, job(i)))
        await wait_for(ready, what)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await r.assert_no_blocks_held()

    async def scenario() -> None:
        async with rig(engines, chunk_delay_s=0.02) as r:
            # prealloc: the decode cache is full, so the request waits for blocks.
            hog = await r.decode_engine.call(lambda e: e.reserve_blocks(63))
            task = asyncio.ensure_future(collect(r.decoder, job(5)))
            await wait_for(lambda: r.decoder.prealloc_depth == 1, "prealloc")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await r.decode_engine.call(lambda e: e.free_reserved(hog))
            await r.assert_no_blocks_held()
            # transfer, before the prefill worker has the request
            r.client.gate = asyncio.Event()
            await cancel_when(r, 0, lambda: r.decoder.in_transfer == 1, "transfer stage")
            r.client.gate = None
            # transfer, while the prefill engine computes (no send started yet)
            await cancel_when(r, 1, lambda: r.prefiller.active == 1, "prefill running")
            # transfer, while the KV is on the (slowed-down) wire
            await cancel_when(r, 2, lambda: r.prefill.sends.in_flight == 1, "KV on the wire")
            # running: after two tokens
            deltas: list[TokenDelta] = []
            stream = r.decoder.run(job(3))
            async with contextlib.aclosing(stream):  # what gRPC does with a cancelled stream
                async for delta in stream:
                    deltas.append(delta)
                    if len(deltas) == 2:
                        break
            await r.assert_no_blocks_held()
            # The rig still works afterwards.
            assert tokens(await collect(r.decoder, job(4))) == engines.expected[4]
            await r.assert_no_blocks_held()

    run(scenario)


@pytest.mark.parametrize("policy", list(PrefillFailurePolicy))
def test_transfer_failure_mid_way(engines: Engines, policy: PrefillFailurePolicy) -> None:
    async def scenario() -> None:
        async with rig(engines, policy=policy) as r:
            r.network.fail_next(r.receiver_address, PeerLost("cable cut"), after_chunks=1)
            if policy is PrefillFailurePolicy.FAIL:
                with pytest.raises(RequestError) as info:
                    await collect(r.decoder, job(2))
                assert info.value.code is ErrorCode.UNAVAILABLE
            else:
                deltas = await collect(r.decoder, job(2))
                assert tokens(deltas) == engines.expected[2]
                assert deltas[0].prefilled_by == "local"
            await r.assert_no_blocks_held()

    run(scenario)


def test_prefill_failure_and_timeout_fall_back_to_local(engines: Engines) -> None:
    async def scenario() -> None:
        async with rig(engines, prefill_timeout_s=0.5) as r:
            r.client.failure = PrefillFailed("unavailable", "prefill worker is gone")
            assert tokens(await collect(r.decoder, job(1))) == engines.expected[1]
            r.client.failure = None
            r.client.gate = asyncio.Event()  # never set: the prefill never answers
            started = time.monotonic()
            deltas = await collect(r.decoder, job(0))
            assert 0.5 <= time.monotonic() - started < 5
            assert tokens(deltas) == engines.expected[0] and deltas[0].prefilled_by == "local"
            await r.assert_no_blocks_held()

    run(scenario)


def test_admission_order_capacity_and_deadline(engines: Engines) -> None:
    async def scenario() -> None:
        async with rig(engines) as r:
            # 64 blocks of 16 tokens: a 1100-token prompt can never fit.
            huge = DecodeJob("huge", tuple([7] * 1100), GREEDY, TARGET)
            with pytest.raises(RequestError) as info:
                await collect(r.decoder, huge)
            assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED
            # Waiting for blocks past the deadline.
            hog = await r.decode_engine.call(lambda e: e.reserve_blocks(62))
            late = job(5, deadline=time.monotonic() + 0.3)
            with pytest.raises(RequestError) as info:
                await collect(r.decoder, late)
            assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
            # FIFO: the big request queued first is served first once blocks free up.
            order: list[str] = []

            async def tracked(i: int) -> None:
                async for delta in r.decoder.run(job(i)):
                    if delta.prefilled_by:
                        order.append(f"r{i}")

            big = asyncio.ensure_future(tracked(5))  # 12 blocks
            await wait_for(lambda: r.decoder.prealloc_depth == 1, "big queued")
            small = asyncio.ensure_future(tracked(0))  # 2 blocks: would fit now
            await wait_for(lambda: r.decoder.prealloc_depth == 2, "small queued")
            await asyncio.sleep(0.05)
            assert order == []  # small does not overtake big
            await r.decode_engine.call(lambda e: e.free_reserved(hog))
            await asyncio.gather(big, small)
            assert order == ["r5", "r0"]
            await r.assert_no_blocks_held()

    run(scenario)


def test_prefill_side_rejects_a_wrong_block_count(engines: Engines) -> None:
    async def scenario() -> None:
        async with rig(engines) as r:
            bad = PrefillJob("x", tuple(PROMPTS[0]), GREEDY, "t", str(r.receiver_address), 9, True)
            with pytest.raises(RequestError) as info:
                await r.prefiller.run(bad)
            assert info.value.code is ErrorCode.INVALID_ARGUMENT
            await r.assert_no_blocks_held()

    run(scenario)
