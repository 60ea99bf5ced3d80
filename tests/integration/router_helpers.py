"""Shared helpers for router integration tests: start a router, call it, wait for state."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from common.launch import wait_until_async
from proto import serving_pb2, serving_pb2_grpc
from router.client import build_request
from router.config import RouterConfig
from router.server import RouterServer


async def start_router(redis_url: str, namespace: str, **config: Any) -> RouterServer:
    data = {
        "port": 0,
        "http_port": 0,
        "redis_url": redis_url,
        "namespace": namespace,
        "refresh_interval_s": 0.05,
        **config,
    }
    server = RouterServer(RouterConfig.from_mapping(data))
    await server.start()
    return server


def run_bounded(main: Coroutine[Any, Any, None], timeout_s: float) -> None:
    """``asyncio.run(main)``, failing after ``timeout_s`` with every task's await chain
    printed: a hung scenario then says where it hangs instead of just timing out."""

    async def bounded() -> None:
        task = asyncio.ensure_future(main)
        done, _ = await asyncio.wait([task], timeout=timeout_s)
        if not done:
            print("stuck tasks:\n" + _await_chains())
            task.cancel()
            raise TimeoutError(f"scenario still running after {timeout_s}s")
        task.result()

    asyncio.run(bounded())


def _await_chains() -> str:
    lines = []
    for task in asyncio.all_tasks():
        lines.append(repr(task))
        coro: Any = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:  # cython coroutines (grpc) have none
                lines.append(f"    {frame.f_code.co_filename}:{frame.f_lineno}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return "\n".join(lines)


async def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    await wait_until_async(condition, timeout_s, what or str(condition))


async def wait_workers(server: RouterServer, pool: str, count: int) -> None:
    await wait_for(
        lambda: server.view.snapshot(pool).num_live == count,
        what=f"{count} live workers in pool {pool}",
    )


def stub(channel: grpc.aio.Channel) -> serving_pb2_grpc.GenerationStub:
    return serving_pb2_grpc.GenerationStub(channel)


async def generate(
    client: serving_pb2_grpc.GenerationStub,
    prompt: str | None = None,
    *,
    timeout_s: float = 30.0,
    **options: Any,
) -> list[serving_pb2.GenerateResponse]:
    request = build_request(prompt, **options)
    return [r async for r in client.Generate(request, timeout=timeout_s)]


async def status_of(
    client: serving_pb2_grpc.GenerationStub, prompt: str | None = None, **options: Any
) -> tuple[grpc.StatusCode, str]:
    """The error status a request ends with (fails the test if it succeeds)."""
    try:
        await generate(client, prompt, **options)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError("the request succeeded")


def text_of(responses: list[serving_pb2.GenerateResponse]) -> str:
    return "".join(r.text for r in responses)


def tokens_of(responses: list[serving_pb2.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]
