"""The HTTP app on a real uvicorn socket, in-process, over a fake Generator: keys, body
limit, error statuses, the SSE shape, and a disconnect cancelling the generation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from common.errors import ErrorCode, RequestError
from common.generation import FinishReason, Usage
from router.api import Chunk, GenerateInput, ModelCard
from router.auth import ApiKeys
from router.http_server import HttpServer, build_app


class FakeGenerator:
    """Says "hello world" in two chunks; ``fail`` raises before the first; ``slow`` never
    finishes (until cancelled)."""

    def __init__(self) -> None:
        self.cancelled = 0

    def list_models(self) -> list[ModelCard]:
        return [ModelCard("m", "default", 2048, 1, 1, True)]

    async def generate(self, req: GenerateInput, timeout_s: float | None) -> AsyncIterator[Chunk]:
        text = req.prompt or req.messages[-1].content  # type: ignore[index]
        if text == "busy":
            raise RequestError(ErrorCode.RESOURCE_EXHAUSTED, "every worker refused")
        yield Chunk(req.request_id, "hello", (1,))
        if text == "slow":
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        yield Chunk(req.request_id, " world", (2,), FinishReason.STOP, Usage(3, 2, 1))


def scenario(check: Any, keys: ApiKeys | None = None, limit: int = 4096) -> FakeGenerator:
    generator = FakeGenerator()

    async def main() -> None:
        server = HttpServer(build_app(generator, keys, limit), "127.0.0.1", 0)  # type: ignore[arg-type]
        await server.start()
        try:
            async with aiohttp.ClientSession(f"http://{server.address}") as session:
                await check(session, generator)
        finally:
            await server.stop(1.0)

    asyncio.run(main())
    return generator


def test_replies_errors_and_sse() -> None:
    async def check(http: aiohttp.ClientSession, _: FakeGenerator) -> None:
        async with http.post("/v1/completions", json={"prompt": "hi", "n": 2}) as r:
            body = await r.json()
            assert r.status == 200 and [c["text"] for c in body["choices"]] == ["hello world"] * 2
            assert body["usage"]["completion_tokens"] == 4 and body["model"] == "m"
        async with http.post("/v1/completions", json={"prompt": "busy"}) as r:
            assert r.status == 429 and r.headers["Retry-After"] == "1"
            assert (await r.json())["error"]["type"] == "rate_limit_error"
        async with http.post("/v1/completions", data=b"{not json") as r:
            assert r.status == 400 and "invalid JSON" in (await r.json())["error"]["message"]
        async with http.post("/v1/completions", data=b"x" * 5000) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "request_too_large"
        chat = {
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with http.post("/v1/chat/completions", json=chat) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [line for line in (await r.text()).split("\n\n") if line]
        assert events[-1] == "data: [DONE]"
        data = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": "hello"}
        assert data[1]["choices"][0]["finish_reason"] == "stop"
        assert data[-1]["choices"] == [] and data[-1]["usage"]["prompt_tokens_details"] == {
            "cached_tokens": 1
        }

    scenario(check)


def test_keys_guard_v1_but_not_health() -> None:
    async def check(http: aiohttp.ClientSession, _: FakeGenerator) -> None:
        async with http.get("/health") as r:
            assert r.status == 200
        for headers in ({}, {"Authorization": "Bearer nope"}):
            async with http.get("/v1/models", headers=headers) as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
        async with http.get("/v1/models", headers={"Authorization": "Bearer sk-1"}) as r:
            assert r.status == 200 and (await r.json())["data"][0]["id"] == "m"

    scenario(check, ApiKeys(["sk-1"]))


def test_a_disconnect_cancels_the_generation() -> None:
    async def check(http: aiohttp.ClientSession, generator: FakeGenerator) -> None:
        body = {"prompt": "slow", "stream": True}
        async with http.post("/v1/completions", json=body) as r:
            await r.content.readline()  # the first event
        for _ in range(200):
            if generator.cancelled:
                break
            await asyncio.sleep(0.01)
        assert generator.cancelled == 1

    scenario(check)
