"""Router → decode worker (``DecodeWorker.Decode``): one request in, a stream of token
deltas out. Converted to and from proto in :mod:`messages.decode_proto` only — by the
decode worker's servicer and by the router's streamer."""

from __future__ import annotations

from dataclasses import dataclass

from common.generation import FinishReason, Usage
from common.logprobs import TokenLogprob
from common.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class PrefillTarget:
    """The prefill worker the router picked for a disaggregated request."""

    worker_id: str  # as registered; reported back in the first delta's ``prefilled_by``
    grpc_address: str  # host:port of its gRPC server (the decode worker calls Prefill there)


@dataclass(frozen=True, slots=True)
class DecodeJob:
    """One Decode call."""

    request_id: str  # unique per attempt (the router adds an attempt suffix)
    prompt: tuple[int, ...]  # the prompt's token ids, already tokenized
    params: SamplingParams  # max_tokens, sampling and stop tokens
    prefill: PrefillTarget | None  # None: prefill on this worker (colocated, or a fallback)
    deadline: float | None = None  # time.monotonic() by which the client gives up
    priority: int = 0  # admission order: higher first
    client_id: str = ""  # the caller, for fair sharing of the admission queue


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """One streamed message: tokens since the previous one; usage on the first and the last
    (completion tokens so far), the finish reason on the last."""

    token_ids: tuple[int, ...]  # new tokens since the previous delta (may be empty)
    finish_reason: FinishReason | None = None  # set on the last delta only
    usage: Usage | None = None  # set on the first and the last delta
    prefilled_by: str = ""  # first delta: the prefill worker's id, or "local"; else ""
    # One per token_ids entry when the request asked for logprobs, else None.
    logprobs: tuple[TokenLogprob, ...] | None = None
    # First delta only, when the request asked for prompt_logprobs (prompt length - 1).
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
