"""Decode worker → prefill worker (``PrefillWorker.Prefill``): one prompt to prefill and
send, one answer once its KV has landed. The same two messages on both sides: the decode
worker builds a :class:`PrefillJob`, the prefill worker runs it and returns a
:class:`PrefillResult`; :mod:`messages.prefill_proto` converts them, on both ends."""

from __future__ import annotations

from dataclasses import dataclass

from common.logprobs import TokenLogprob
from common.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class PrefillJob:
    """What a decode worker asks of a prefill worker for one request."""

    request_id: str  # the decode worker's id of the request (for logs)
    prompt: tuple[int, ...]  # the prompt's token ids
    params: SamplingParams  # samples the first token (the prefill generates only that one)
    transfer_id: str  # names the RecvSpec the decode worker registered
    kv_address: str  # host:port of the decode worker's KV receiver
    num_blocks: int  # destination blocks reserved there; the prompt must fill exactly these
    layer_wise: bool  # send each layer's KV as soon as it is computed
    deadline: float | None = None  # time.monotonic() by which the decode worker gives up
    priority: int = 0  # admission order: higher first (the client's)
    client_id: str = ""  # the client, for fair sharing of the admission queue


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """The answer, sent once the prompt's KV has landed in the reserved blocks."""

    first_token: int  # sampled by the prefill worker; the decode worker streams it first
    cached_tokens: int  # prompt tokens served by the prefill worker's prefix cache
    prompt_tokens: int  # the prompt's length, as the prefill engine counted it
    kv_bytes: int  # bytes of KV sent
    transfer_seconds: float  # from the send's start to its last byte landing
    first_logprob: TokenLogprob | None = None  # the first token's, when asked
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # when asked
