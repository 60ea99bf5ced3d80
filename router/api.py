"""The public API's messages (client ↔ router, ``proto/serving.proto``) as dataclasses.

What a client sends (:class:`GenerateInput`, with :class:`ChatMessage` and
:class:`SamplingSpec`), what it receives (:class:`Chunk`, the first one with a
:class:`RouteInfo`, the last one with :mod:`common.generation`'s ``FinishReason`` and
``Usage``) and what ``ListModels`` lists (:class:`ModelCard`). Failures are
:class:`common.errors.RequestError`.

:mod:`router.api_proto` is the only place these meet ``serving_pb2``; the servicer and
:mod:`router.client` both go through it. Pure: no proto, no gRPC, cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.generation import FinishReason, Usage
from common.logprobs import TokenLogprob

# ---- request ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """Sampling as the client sent it (proto defaults: 0 = unset where documented)."""

    max_tokens: int = 0  # 0 = the router's default
    temperature: float = 0.0
    top_p: float = 0.0  # 0 = disabled (1)
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # per generated token, its log-prob and this many others
    prompt_logprobs: bool = False
    speculative: bool | None = None  # None: the worker's default; False: opt out


@dataclass(frozen=True, slots=True)
class GenerateInput:
    """Exactly one of ``prompt`` / ``messages`` / ``token_ids`` is set (or none: an error)."""

    request_id: str = ""
    model: str = ""
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    sampling: SamplingSpec = SamplingSpec()
    priority: int = 0  # admission order under load: higher first (0 normal, 1 high; 0..9)
    client_id: str = ""  # the caller (x-client-id / X-Client-Id / its API key); "" = anonymous

    @property
    def semantic_text(self) -> str | None:
        """The text semantic routing embeds: the prompt, or the last user message."""
        if self.prompt is not None:
            return self.prompt
        for message in reversed(self.messages or ()):
            if message.role == "user":
                return message.content
        return None


# ---- reply -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteInfo:
    pool: str
    prefill_worker: str  # "" when the decode worker prefilled itself
    decode_worker: str
    semantic_route: str  # "" when none matched
    policy: str
    predicted_cached_tokens: int
    attempts: int
    prefill_mode: str = ""  # "remote" (a prefill worker) | "local" (the decode worker)


@dataclass(frozen=True, slots=True)
class Chunk:
    request_id: str
    text: str  # delta, valid UTF-8
    token_ids: tuple[int, ...]  # delta
    finish_reason: FinishReason | None = None  # last chunk only
    usage: Usage | None = None  # last chunk only
    route: RouteInfo | None = None  # first chunk only
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token_ids entry, when asked
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # first chunk only, when asked
    # The text of each token id in ``logprobs`` (sampled and alternatives), for the HTTP
    # API's replies; not sent over gRPC (clients there detokenize ids themselves).
    token_texts: dict[int, str] | None = None


# ---- ListModels ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelCard:
    name: str
    pool: str
    context_length: int
    prefill_workers: int  # live ones, as this router sees them now
    decode_workers: int  # decode or colocated
    is_default: bool
