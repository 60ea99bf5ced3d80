"""A small blocking client for the router, and the terminal printing ``pdserve chat`` uses.

    from router.client import build_request, stream_generate, run
    for response in stream_generate("127.0.0.1:50051", build_request("Hi!", chat=True)):
        print(response.text, end="", flush=True)

    # what `pdserve chat "prompt"` / `pdserve generate "prompt"` call:
    exit_code = run("127.0.0.1:50051", "Hi!", chat=True, max_tokens=64)

Only the generated proto and grpcio: usable from any Python process, no router internals.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TextIO

import grpc

from proto import serving_pb2, serving_pb2_grpc

FINISH_NAMES = {
    serving_pb2.FINISH_REASON_STOP: "stop",
    serving_pb2.FINISH_REASON_LENGTH: "length",
    serving_pb2.FINISH_REASON_ABORT: "abort",
}


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
) -> serving_pb2.GenerateRequest:
    """A GenerateRequest. ``chat=True`` sends ``prompt`` as a user message (after an
    optional ``system`` message); ``messages`` are (role, content) pairs."""
    sampling = serving_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=list(stop),
        ignore_eos=ignore_eos,
    )
    if seed is not None:
        sampling.seed = seed
    request = serving_pb2.GenerateRequest(request_id=request_id, model=model, sampling=sampling)
    if chat and prompt is not None:
        pairs = [("system", system)] if system else []
        messages = [*pairs, ("user", prompt)]
    if messages is not None:
        request.messages.messages.extend(
            serving_pb2.ChatMessage(role=role, content=content) for role, content in messages
        )
    elif token_ids is not None:
        request.token_ids.ids.extend(token_ids)
    elif prompt is not None:
        request.prompt = prompt
    return request


def stream_generate(
    address: str, request: serving_pb2.GenerateRequest, timeout_s: float | None = None
) -> Iterator[serving_pb2.GenerateResponse]:
    """The router's responses as they arrive; raises grpc.RpcError on an error status.

    Closing the iterator early (``break``) cancels the request on the router and workers.
    """
    with grpc.insecure_channel(address) as channel:
        call = serving_pb2_grpc.GenerationStub(channel).Generate(request, timeout=timeout_s)
        try:
            yield from call
        finally:
            call.cancel()


def list_models(address: str, timeout_s: float = 5.0) -> list[serving_pb2.ModelCard]:
    with grpc.insecure_channel(address) as channel:
        stub = serving_pb2_grpc.GenerationStub(channel)
        return list(stub.ListModels(serving_pb2.ListModelsRequest(), timeout=timeout_s).models)


@dataclass(frozen=True, slots=True)
class StreamResult:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # stop | length | abort | "" (stream ended without one)
    usage: serving_pb2.Usage | None
    route: serving_pb2.Route | None
    ttft_s: float | None
    total_s: float


def collect(
    responses: Iterator[serving_pb2.GenerateResponse], out: TextIO | None = None
) -> StreamResult:
    """Consume a stream (printing text deltas to ``out`` as they arrive, if given)."""
    start = time.monotonic()
    ttft: float | None = None
    parts: list[str] = []
    ids: list[int] = []
    finish, usage, route = "", None, None
    for response in responses:
        if ttft is None:
            ttft = time.monotonic() - start
        if response.HasField("route"):
            route = response.route
        if response.text:
            parts.append(response.text)
            if out is not None:
                out.write(response.text)
                out.flush()
        ids.extend(response.token_ids)
        if response.finish_reason:
            finish = FINISH_NAMES.get(response.finish_reason, str(response.finish_reason))
        if response.HasField("usage"):
            usage = response.usage
    return StreamResult(
        "".join(parts), tuple(ids), finish, usage, route, ttft, time.monotonic() - start
    )


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
    **options: object,
) -> int:
    """Stream a reply to the terminal; returns a process exit code (0 ok, 1 error).

    ``options`` are :func:`build_request` keywords (model, max_tokens, temperature, top_p,
    top_k, seed, stop, ignore_eos, system, request_id). The text goes to ``out``; the
    summary line (``verbose``) and errors (``error: CODE: message``) go to ``err``.
    """
    request = build_request(prompt, chat=chat, **options)  # type: ignore[arg-type]
    try:
        result = collect(stream_generate(address, request, timeout_s), out)
    except grpc.RpcError as exc:
        out.write("\n")
        err.write(f"error: {exc.code().name}: {exc.details()}\n")  # type: ignore[attr-defined]
        return 1
    except KeyboardInterrupt:
        err.write("\ninterrupted\n")
        return 130
    out.write("\n")
    if verbose:
        err.write(describe(result) + "\n")
    return 0
