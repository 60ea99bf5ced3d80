"""The OpenAI-compatible HTTP API: an ASGI app (FastAPI) on uvicorn, in the router's loop.

Same :class:`~router.generation.Generator` as gRPC, so the same routing, limits and
metrics. Lifecycle of one request::

    auth       /v1/*: ``Authorization: Bearer <key>`` when keys are set (401); /health open.
               The caller (fair sharing): ``X-Client-Id``, else body ``user``, else the key
    body       read up to the size limit (413), JSON (400), parsed by router.openai_convert
               into one GenerateInput per choice (400 with the parameter named)
    generate   router.choices.Choices runs the choices; an error before the first chunk
               is the reply's status (router.openai_convert's table)
    reply      whole JSON, or server-sent events ``data: {chunk}`` … ``data: [DONE]``; an
               error mid-stream is one ``data: {"error": …}`` event
    cancel     a client that disconnects closes the run: its requests stop on the workers

Lifecycle of the server: :class:`HttpServer` ``start()`` binds (port 0 = a free one) and
serves; ``stop(grace_s)`` stops accepting, lets open responses finish within the grace,
then closes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from common.errors import RequestError, invalid
from common.generation import Usage
from router import openai_convert as oc
from router.api import GenerateInput
from router.auth import ApiKeys, client_id_of
from router.choices import Choices
from router.generation import Generator

CLIENT_ID_HEADER = "x-client-id"  # names the caller for fair sharing of the queues


class _TooLarge(Exception):
    pass


def build_app(generator: Generator, keys: ApiKeys | None, max_body_bytes: int) -> FastAPI:
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)

    def denied(request: Request) -> Response | None:
        if keys is None or keys.check_authorization(request.headers.get("authorization")):
            return None
        return _error(oc.unauthorized())

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return denied(request) or JSONResponse(oc.models_json(generator.list_models()))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return denied(request) or await _complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return denied(request) or await _complete(request, chat=True)

    async def _complete(request: Request, chat: bool) -> Response:
        try:
            body = await _read_json(request, max_body_bytes)
            reply_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            parse = oc.parse_chat if chat else oc.parse_completion
            req, inputs = parse(body, reply_id)
        except _TooLarge:
            return _error(oc.body_too_large(max_body_bytes))
        except ValidationError as exc:
            return _error(oc.validation_error_reply(exc))
        except RequestError as exc:
            return _error(oc.request_error_reply(exc))
        inputs = [_with_client_id(one, request) for one in inputs]
        model = req.model or _default_model(generator)
        reply = oc.Reply(chat, reply_id, model, int(time.time()), req.logprobs_k is not None)
        run = Choices(generator, inputs)
        if req.stream:
            return await _stream(request, run, reply, len(inputs), req.n, req.include_usage)
        return await _whole(request, run, reply, len(inputs), req.n)

    return app


def _with_client_id(one: GenerateInput, request: Request) -> GenerateInput:
    """The caller: the ``X-Client-Id`` header, else the body's ``user``, else the API
    key's fingerprint, else anonymous ("")."""
    named = request.headers.get(CLIENT_ID_HEADER) or one.client_id
    caller = named or client_id_of(request.headers.get("authorization"))
    return dataclasses.replace(one, client_id=caller) if caller != one.client_id else one


def _default_model(generator: Generator) -> str:
    return next((c.name for c in generator.list_models() if c.is_default), "")


def _error(reply: oc.ErrorReply) -> Response:
    return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise _TooLarge
    try:
        return json.loads(body)
    except ValueError as exc:
        raise invalid(f"invalid JSON body: {exc}") from None


async def _whole(request: Request, run: Choices, reply: oc.Reply, count: int, n: int) -> Response:
    """Collect every choice; a client that disconnects first cancels them."""
    texts: list[list[str]] = [[] for _ in range(count)]
    last: list[Any] = [None] * count
    usages: list[Usage | None] = [None] * count
    logprobs = [reply.accumulator() for _ in range(count)]

    async def collect() -> None:
        async for index, chunk in run:
            texts[index].append(chunk.text)
            if (acc := logprobs[index]) is not None:
                acc.add(chunk.logprobs, chunk.token_texts)
            if chunk.finish_reason is not None:
                last[index] = chunk.finish_reason
            if chunk.usage is not None:
                usages[index] = chunk.usage

    try:
        if not await _unless_disconnected(request, collect()):
            return Response(status_code=499)  # nobody reads it
    except RequestError as exc:
        return _error(oc.request_error_reply(exc))
    finally:
        await run.close()
    results = zip(texts, last, usages, logprobs, strict=True)
    choices = [oc.ChoiceResult("".join(t), f, u, lp) for t, f, u, lp in results]
    return JSONResponse(reply.final(choices, n))


async def _unless_disconnected(request: Request, work: Any) -> bool:
    """Run ``work``; False (and ``work`` cancelled) if the client disconnects first."""
    working = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({working, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not working.done():
            return False
        working.result()
        return True
    finally:
        gone.cancel()
        working.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(
    request: Request, run: Choices, reply: oc.Reply, count: int, n: int, include_usage: bool
) -> Response:
    events = aiter(run)
    firsts: list[Any] = []

    async def first_event() -> None:  # an error before any token is the reply's status
        with contextlib.suppress(StopAsyncIteration):
            firsts.append(await anext(events))

    try:
        if not await _unless_disconnected(request, first_event()):
            await run.close()
            return Response(status_code=499)
    except RequestError as exc:
        await run.close()
        return _error(oc.request_error_reply(exc))
    except BaseException:
        await run.close()
        raise

    async def body() -> AsyncIterator[str]:
        started: set[int] = set()
        usages: list[Usage | None] = [None] * count
        try:
            async for index, chunk in _chain(firsts, events):
                if chunk.usage is not None:
                    usages[index] = chunk.usage
                is_first = index not in started
                started.add(index)
                wanted = chunk.text or chunk.finish_reason is not None or (is_first and reply.chat)
                if wanted or (reply.logprobs and chunk.logprobs):
                    data = reply.chunk(
                        index,
                        chunk.text,
                        chunk.finish_reason,
                        first=is_first,
                        logprobs=chunk.logprobs,
                        texts=chunk.token_texts,
                    )
                    yield _event(data)
            if include_usage:
                yield _event(reply.usage_chunk(usages, n))
        except RequestError as exc:
            yield _event(oc.request_error_reply(exc).body)
        finally:
            await run.close()
        yield "data: [DONE]\n\n"

    return _EventStream(body(), run.close)


async def _chain(first: list[Any], rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    for item in first:
        yield item
    async for item in rest:
        yield item


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events that always watch for the client leaving (whatever the ASGI
    spec version) and always close the run, so its choices are cancelled at once."""

    def __init__(self, content: AsyncIterator[str], close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._close = close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        streaming = asyncio.ensure_future(self.stream_response(send))
        listening = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({streaming, listening}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, listening):
                task.cancel()
            await asyncio.gather(streaming, listening, return_exceptions=True)
            await self._close()


# ---- the server ------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the process owns its signals
        yield


class HttpServer:
    def __init__(self, app: Any, host: str, port: int, ssl: dict[str, Any] | None = None) -> None:
        self._app = app
        self._host = host
        self._requested_port = port
        self._ssl = ssl or {}
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._port: int | None = None

    @property
    def address(self) -> str:
        if self._port is None:
            raise RuntimeError("HttpServer.address is only known after start()")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self._port}"

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._requested_port))
        except OSError as exc:
            sock.close()
            target = f"{self._host}:{self._requested_port}"
            raise OSError(f"could not bind HTTP server to {target}: {exc}") from exc
        sock.setblocking(False)
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
            **self._ssl,
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is None or self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = max(int(grace_s), 1)
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
