"""AsyncEngine: concurrent streams from asyncio equal the offline engine; abandoned
streams free their blocks."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from engine import LLM, SamplingParams
from engine.async_engine import AsyncEngine

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(num_kv_blocks=128)


async def collect(engine: AsyncEngine, request_id: str, prompt: list[int]) -> list[int]:
    tokens: list[int] = []
    async for out in engine.generate(request_id, prompt, PARAMS):
        tokens.extend(out.new_token_ids)
    return tokens


def test_concurrent_streams_match_offline(llm: LLM) -> None:
    prompts = [list(range(300 + i, 320 + 9 * i)) for i in range(6)]
    expected = [o.token_ids for o in llm.generate(prompts, PARAMS)]

    async def run() -> list[list[int]]:
        engine = AsyncEngine(llm.engine)
        engine.start()
        try:
            return await asyncio.gather(
                *(collect(engine, f"r{i}", p) for i, p in enumerate(prompts))
            )
        finally:
            engine.stop()

    assert asyncio.run(run()) == expected


def test_abandoned_stream_frees_blocks_and_bad_input_raises(llm: LLM) -> None:
    async def run() -> None:
        engine = AsyncEngine(llm.engine)
        engine.start()
        try:
            long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
            stream = engine.generate("cancel-me", list(range(100, 180)), long)
            async with contextlib.aclosing(stream):
                async for _ in stream:
                    break
            await engine.call(lambda e: None)  # the abort command runs before this one
            assert await engine.call(lambda e: e.block_manager.num_used_blocks) == 0
            with pytest.raises(ValueError, match="empty"):
                await collect(engine, "bad", [])
            assert await collect(engine, "after", [1, 2, 3])
        finally:
            engine.stop()

    asyncio.run(run())
