"""Targets: the servers a load run can drive, behind one small interface.

    target = open_target("grpc://127.0.0.1:50051")        # pdserve's public API
    target = open_target("http://127.0.0.1:8000", model="…")  # any OpenAI-compatible server
    await target.send(request, record, clock, timeout_s)   # fills in the record
    await target.close()

``send`` never raises for a server-side failure: it writes the status into
``record.error`` (the gRPC status name, ``HTTP_<code>``, ``TIMEOUT`` or ``CONNECTION``), so
one bad request never ends a run. An overload refusal before any token (gRPC
RESOURCE_EXHAUSTED, HTTP 429) is not an error: ``record.refuse(retry_after_s)`` marks it,
with the hint from ``retry-after-ms`` trailing metadata / ``Retry-After`` header
(:func:`classify_rpc_error`, :func:`classify_http_status`). Cancellation (the run's
deadline) propagates. An ``api_key`` goes out as ``authorization: Bearer`` (gRPC metadata
or the HTTP header).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from common.errors import RETRY_AFTER_METADATA
from loadgen.record import ChatRequest, RequestRecord

if TYPE_CHECKING:
    import aiohttp

Clock = Callable[[], float]  # seconds since the run started


class Target(Protocol):
    name: str

    async def send(
        self, request: ChatRequest, record: RequestRecord, clock: Clock, timeout_s: float
    ) -> None: ...

    async def close(self) -> None: ...


def open_target(url: str, model: str = "", api_key: str | None = None) -> Target:
    """``grpc://host:port`` → :class:`GrpcTarget`; ``http(s)://…`` → :class:`OpenAITarget`."""
    if url.startswith("grpc://"):
        return GrpcTarget(url.removeprefix("grpc://"), model, api_key)
    if url.startswith(("http://", "https://")):
        return OpenAITarget(url, model, api_key)
    raise ValueError(f"target {url!r}: expected grpc://HOST:PORT or http://HOST:PORT")


class GrpcTarget:
    """pdserve's router: ``Generation.Generate`` with chat messages, one channel."""

    def __init__(self, address: str, model: str = "", api_key: str | None = None) -> None:
        import grpc

        from proto import serving_pb2_grpc

        self.name = f"grpc://{address}"
        self._model = model
        self._metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = serving_pb2_grpc.GenerationStub(self._channel)

    async def send(
        self, request: ChatRequest, record: RequestRecord, clock: Clock, timeout_s: float
    ) -> None:
        import grpc

        from router.api_proto import chunk_from_proto
        from router.client import build_request

        message = build_request(
            messages=[(m["role"], m["content"]) for m in request.messages],
            model=self._model,
            request_id=request.request_id,
            max_tokens=request.max_tokens,
            ignore_eos=request.ignore_eos,
        )
        parts: list[str] = []
        record.sent_s = clock()
        try:
            calls = self._stub.Generate(message, timeout=timeout_s, metadata=self._metadata)
            async for response in calls:
                chunk = chunk_from_proto(response)  # the router client's own translation
                if chunk.token_ids:
                    record.add_chunk(clock(), len(chunk.token_ids))
                parts.append(chunk.text)
                if chunk.route is not None:
                    r = chunk.route
                    record.route = f"{r.prefill_worker or '-'}>{r.decode_worker}"
                if response.finish_reason:  # a reason this client does not know reads "?"
                    record.finish_reason = getattr(chunk.finish_reason, "value", "?")
                if chunk.usage is not None:
                    record.prompt_tokens = chunk.usage.prompt_tokens
                    record.cached_tokens = chunk.usage.cached_tokens
                    record.output_tokens = chunk.usage.completion_tokens
        except grpc.aio.AioRpcError as exc:
            classify_rpc_error(exc.code().name, exc.trailing_metadata(), record)
        record.end_s = clock()
        record.reply = "".join(parts)
        if not record.output_tokens:
            record.output_tokens = sum(record.chunk_tokens)

    async def close(self) -> None:
        await self._channel.close()


class OpenAITarget:
    """``POST /v1/chat/completions`` with ``stream: true``, read as server-sent events."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None) -> None:
        self.name = base_url
        self._url = base_url.rstrip("/") + "/v1/chat/completions"
        self._model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None

    async def _client(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0)  # the run bounds concurrency itself
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    def body(self, request: ChatRequest) -> dict:
        body = {
            "model": self._model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.ignore_eos:  # a vLLM / SGLang extension; strict servers reject it (422)
            body["ignore_eos"] = True
        return body

    async def send(
        self, request: ChatRequest, record: RequestRecord, clock: Clock, timeout_s: float
    ) -> None:
        import aiohttp

        session = await self._client()
        parts: list[str] = []
        record.sent_s = clock()
        try:
            async with asyncio.timeout(timeout_s):
                body = self.body(request)
                async with session.post(self._url, json=body, headers=self._headers) as response:
                    if response.status != 200:
                        classify_http_status(response.status, response.headers, record)
                    else:
                        async for line in response.content:
                            _read_event(line, record, parts, clock)
        except TimeoutError:
            record.error = "TIMEOUT"
        except aiohttp.ClientError:
            record.error = "CONNECTION"
        record.end_s = clock()
        record.reply = "".join(parts)
        if not record.output_tokens:
            record.output_tokens = sum(record.chunk_tokens)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


REFUSAL_CODE = "RESOURCE_EXHAUSTED"
REFUSAL_HTTP_STATUS = 429
RETRY_AFTER_MS_KEY = RETRY_AFTER_METADATA  # the router's trailing-metadata / header key


def classify_rpc_error(
    code: str, trailing: Iterable[tuple[str, str | bytes]] | None, record: RequestRecord
) -> None:
    """A failed call's status: a refusal (RESOURCE_EXHAUSTED before any token, with the
    ``retry-after-ms`` trailing metadata as its hint) or an error named by its code."""
    if code != REFUSAL_CODE or record.chunk_times:
        record.error = code
        return
    hint = next((v for k, v in trailing or () if k.lower() == RETRY_AFTER_MS_KEY), None)
    record.refuse(_seconds(hint, scale=1e-3))


def classify_http_status(status: int, headers: Mapping[str, str], record: RequestRecord) -> None:
    """A non-200 answer: 429 is a refusal (hint: ``retry-after-ms``, else ``Retry-After``
    in seconds; an HTTP-date is not a number and gives no hint), anything else an error."""
    if status != REFUSAL_HTTP_STATUS:
        record.error = f"HTTP_{status}"
        return
    lowered = {k.lower(): v for k, v in headers.items()}
    if RETRY_AFTER_MS_KEY in lowered:
        record.refuse(_seconds(lowered[RETRY_AFTER_MS_KEY], scale=1e-3))
    else:
        record.refuse(_seconds(lowered.get("retry-after"), scale=1.0))


def _seconds(value: str | bytes | None, scale: float) -> float | None:
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    try:
        return float(text) * scale
    except ValueError:
        return None


def _read_event(line: bytes, record: RequestRecord, parts: list[str], clock: Clock) -> None:
    """One SSE line: ``data: {chunk}`` (a content delta, a finish reason, usage) or
    ``data: [DONE]``; anything else (comments, blank lines) is ignored."""
    text = line.decode("utf-8", errors="replace").strip()
    if not text.startswith("data:"):
        return
    payload = text.removeprefix("data:").strip()
    if payload == "[DONE]":
        return
    chunk = json.loads(payload)
    for choice in chunk.get("choices") or ():
        content = (choice.get("delta") or {}).get("content")
        if content:
            record.add_chunk(clock(), 1)  # one streamed delta; usage gives the token total
            parts.append(content)
        if choice.get("finish_reason"):
            record.finish_reason = choice["finish_reason"]
    usage = chunk.get("usage")
    if usage:
        record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        record.output_tokens = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        if details.get("cached_tokens") is not None:
            record.cached_tokens = int(details["cached_tokens"])
