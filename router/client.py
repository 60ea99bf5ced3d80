"""A small blocking client for the router, and the terminal printing ``pdserve chat`` uses.

    from router.client import build_request, stream_generate, run
    for response in stream_generate("127.0.0.1:50051", build_request("Hi!", chat=True)):
        print(response.text, end="", flush=True)

    # what `pdserve chat "prompt"` / `pdserve generate "prompt"` call:
    exit_code = run("127.0.0.1:50051", "Hi!", chat=True, max_tokens=64)

A router that requires API keys gets ``api_key=`` as ``authorization: Bearer`` metadata;
one serving TLS is dialled with ``tls_ca_file=`` (the PEM CA, or certificate, to trust).

Requests and replies are translated by :mod:`router.api_proto`, the same module the
servicer uses; the rest is grpcio. It imports only :mod:`router.api` and
:mod:`router.api_proto` of the router (no tokenizer, no Redis): usable from any Python
process.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import grpc

from common.generation import Usage
from common.logprobs import TokenLogprob
from proto import serving_pb2, serving_pb2_grpc
from router import api_proto
from router.api import ChatMessage, GenerateInput, ModelCard, RouteInfo, SamplingSpec


def build_request(
    prompt: str | None = None,
    *,
    chat: bool = False,
    system: str | None = None,
    messages: Sequence[tuple[str, str]] | None = None,
    token_ids: Sequence[int] | None = None,
    model: str = "",
    request_id: str = "",
    max_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    priority: int = 0,
    logprobs: int | None = None,
    prompt_logprobs: bool = False,
    speculative: bool | None = None,
) -> serving_pb2.GenerateRequest:
    """A GenerateRequest. ``chat=True`` sends ``prompt`` as a user message (after an
    optional ``system`` message); ``messages`` are (role, content) pairs."""
    sampling = SamplingSpec(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=tuple(stop),
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        speculative=speculative,
    )
    if chat and prompt is not None:
        pairs = [("system", system)] if system else []
        messages = [*pairs, ("user", prompt)]
    req = GenerateInput(request_id=request_id, model=model, sampling=sampling, priority=priority)
    if messages is not None:  # the first of messages, token_ids, prompt that is given
        chat_messages = tuple(ChatMessage(role, content) for role, content in messages)
        req = replace(req, messages=chat_messages)
    elif token_ids is not None:
        req = replace(req, token_ids=tuple(token_ids))
    elif prompt is not None:
        req = replace(req, prompt=prompt)
    return api_proto.input_to_proto(req)


def auth_metadata(api_key: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {api_key}")] if api_key else []


def open_channel(address: str, tls_ca_file: str | None = None) -> grpc.Channel:
    if tls_ca_file is None:
        return grpc.insecure_channel(address)
    roots = Path(tls_ca_file).read_bytes()
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=roots))


def stream_generate(
    address: str,
    request: serving_pb2.GenerateRequest,
    timeout_s: float | None = None,
    api_key: str | None = None,
    tls_ca_file: str | None = None,
) -> Iterator[serving_pb2.GenerateResponse]:
    """The router's responses as they arrive; raises grpc.RpcError on an error status.

    Closing the iterator early (``break``) cancels the request on the router and workers.
    """
    with open_channel(address, tls_ca_file) as channel:
        call = serving_pb2_grpc.GenerationStub(channel).Generate(
            request, timeout=timeout_s, metadata=auth_metadata(api_key)
        )
        try:
            yield from call
        finally:
            call.cancel()


def list_models(
    address: str,
    timeout_s: float = 5.0,
    api_key: str | None = None,
    tls_ca_file: str | None = None,
) -> list[ModelCard]:
    with open_channel(address, tls_ca_file) as channel:
        stub = serving_pb2_grpc.GenerationStub(channel)
        reply = stub.ListModels(
            api_proto.list_models_request(), timeout=timeout_s, metadata=auth_metadata(api_key)
        )
        return api_proto.models_from_proto(reply)


@dataclass(frozen=True, slots=True)
class StreamResult:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # stop | length | abort | "" (stream ended without one)
    usage: Usage | None
    route: RouteInfo | None
    ttft_s: float | None
    total_s: float
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when the request asked


def collect(
    responses: Iterator[serving_pb2.GenerateResponse], out: TextIO | None = None
) -> StreamResult:
    """Consume a stream (printing text deltas to ``out`` as they arrive, if given)."""
    start = time.monotonic()
    ttft: float | None = None
    parts: list[str] = []
    ids: list[int] = []
    logprobs: list[TokenLogprob] = []
    finish, usage, route = "", None, None
    for response in responses:
        if ttft is None:
            ttft = time.monotonic() - start
        chunk = api_proto.chunk_from_proto(response)
        if chunk.route is not None:
            route = chunk.route
        if chunk.text:
            parts.append(chunk.text)
            if out is not None:
                out.write(chunk.text)
                out.flush()
        ids.extend(chunk.token_ids)
        logprobs.extend(chunk.logprobs or ())
        if chunk.finish_reason is not None:
            finish = chunk.finish_reason.value
        if chunk.usage is not None:
            usage = chunk.usage
    elapsed = time.monotonic() - start
    return StreamResult(
        "".join(parts), tuple(ids), finish, usage, route, ttft, elapsed, tuple(logprobs)
    )


def describe_logprobs(logprobs: Sequence[TokenLogprob]) -> str:
    """One line per generated token: its id, log-prob and the alternatives asked for."""
    lines = []
    for i, entry in enumerate(logprobs):
        top = " ".join(f"{tid}:{lp:.3f}" for tid, lp in entry.top)
        lines.append(f"{i:4d} id={entry.token_id} logprob={entry.logprob:.4f}  top {top}")
    return "\n".join(lines)


def describe(result: StreamResult) -> str:
    """One summary line: finish reason, token counts, timings and route."""
    bits = [f"finish={result.finish_reason or '-'}"]
    if result.usage is not None:
        u = result.usage
        bits.append(f"tokens={u.prompt_tokens}+{u.completion_tokens} cached={u.cached_tokens}")
    if result.ttft_s is not None:
        bits.append(f"ttft={result.ttft_s * 1000:.0f}ms")
    bits.append(f"total={result.total_s * 1000:.0f}ms")
    if result.route is not None:
        r = result.route
        path = f"{r.prefill_worker or 'local'}→{r.decode_worker}"
        semantic = f" route={r.semantic_route}" if r.semantic_route else ""
        bits.append(f"pool={r.pool}{semantic} {path}")
    return " ".join(bits)


def run(
    address: str,
    prompt: str,
    *,
    chat: bool = True,
    timeout_s: float | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    verbose: bool = True,
    api_key: str | None = None,
    tls_ca_file: str | None = None,
    **options: object,
) -> int:
    """Stream a reply to the terminal; returns a process exit code (0 ok, 1 error).

    ``options`` are :func:`build_request` keywords (model, max_tokens, temperature, top_p,
    top_k, seed, stop, ignore_eos, system, request_id, logprobs). The text goes to ``out``; the
    summary line (``verbose``) and errors (``error: CODE: message``) go to ``err``.
    """
    request = build_request(prompt, chat=chat, **options)  # type: ignore[arg-type]
    try:
        responses = stream_generate(address, request, timeout_s, api_key, tls_ca_file)
        result = collect(responses, out)
    except grpc.RpcError as exc:
        out.write("\n")
        err.write(f"error: {exc.code().name}: {exc.details()}\n")  # type: ignore[attr-defined]
        return 1
    except KeyboardInterrupt:
        err.write("\ninterrupted\n")
        return 130
    out.write("\n")
    if verbose:
        if result.logprobs:
            err.write(describe_logprobs(result.logprobs) + "\n")
        err.write(describe(result) + "\n")
    return 0
