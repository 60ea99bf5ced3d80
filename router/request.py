"""A client request on its way in: validation and tokenization.

Lifecycle of one request in this module (each step raises
:class:`~common.errors.RequestError`, INVALID_ARGUMENT)::

    GenerateInput   (router.api) as router.api_proto read it, nothing checked yet
      → check_input(input, limits)        shape, sizes, roles, sampling values
      → tokenize(input, tokenizer)        prompt / chat template / token ids → token ids
      → finalize(...)                     context length, max_tokens → PreparedRequest

Everything here is pure: no proto, no gRPC, no torch.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

from common.errors import invalid
from common.sampling import MAX_LOGPROBS, SamplingParams
from router.api import ChatMessage, GenerateInput, SamplingSpec
from router.config import LimitsConfig
from router.tokenizer import ModelTokenizer

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_PRIORITY = 9  # priorities are 0 (normal) .. 9; higher is admitted first
MAX_CLIENT_ID_CHARS = 128
MAX_REQUEST_ID_CHARS = 256
MAX_STOP_STRING_CHARS = 1024


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A valid, tokenized request, ready to route."""

    request_id: str
    token_ids: tuple[int, ...]
    sampling: SamplingParams  # resolved: what the decode worker receives
    stop: tuple[str, ...]  # stop strings, applied on text by the router
    priority: int = 0  # admission order on the workers: higher first
    client_id: str = ""  # the caller, for fair sharing of the workers' queues


def check_input(req: GenerateInput, limits: LimitsConfig) -> str:
    """Validate what needs no tokenizer; returns the request id to use (generated if empty)."""
    request_id = req.request_id or uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
        raise invalid(f"request_id must be <= {MAX_REQUEST_ID_CHARS} printable characters")
    given = [x is not None for x in (req.prompt, req.messages, req.token_ids)]
    if sum(given) != 1:
        raise invalid("exactly one of prompt, messages or token_ids is required")
    if req.prompt is not None:
        if not req.prompt:
            raise invalid("prompt is empty")
        _check_chars(len(req.prompt), limits)
    elif req.messages is not None:
        _check_messages(req.messages, limits)
    elif not req.token_ids:
        raise invalid("token_ids is empty")
    _check_sampling(req.sampling, limits)
    if not 0 <= req.priority <= MAX_PRIORITY:
        raise invalid(f"priority must be in [0, {MAX_PRIORITY}] (higher first), got {req.priority}")
    if len(req.client_id) > MAX_CLIENT_ID_CHARS or not req.client_id.isprintable():
        raise invalid(f"client id must be <= {MAX_CLIENT_ID_CHARS} printable characters")
    return request_id


def tokenize(req: GenerateInput, tokenizer: ModelTokenizer) -> tuple[int, ...]:
    """The prompt's token ids, as the engine would compute them."""
    if req.prompt is not None:
        ids = tokenizer.encode(req.prompt)
    elif req.messages is not None:
        try:
            ids = tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in req.messages]
            )
        except ValueError as exc:
            raise invalid(str(exc)) from None
    else:
        ids = list(req.token_ids or ())
        vocab = tokenizer.facts.vocab_size
        if ids and max(ids) >= vocab:
            bad = [t for t in ids if t >= vocab]
            raise invalid(f"token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    if not ids:
        raise invalid("the prompt tokenizes to nothing")
    return tuple(ids)


def finalize(
    request_id: str,
    token_ids: tuple[int, ...],
    spec: SamplingSpec,
    context_len: int,
    vocab_size: int,
    limits: LimitsConfig,
) -> PreparedRequest:
    """Check the lengths against the context and resolve max_tokens."""
    room = context_len - len(token_ids)
    if room < 1:
        raise invalid(
            f"prompt has {len(token_ids)} tokens; the context length is {context_len} "
            "(at least one token must be generated)"
        )
    if spec.max_tokens == 0:
        max_tokens = min(limits.default_max_tokens, room)
    elif spec.max_tokens > room:
        raise invalid(
            f"max_tokens {spec.max_tokens} is too large: the prompt has {len(token_ids)} "
            f"tokens and the context length is {context_len} (at most {room})"
        )
    else:
        max_tokens = spec.max_tokens
    bad = [t for t in spec.stop_token_ids if t >= vocab_size]
    if bad:
        raise invalid(f"stop_token_ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=float(spec.temperature),
        top_p=float(spec.top_p) if spec.top_p > 0 else 1.0,
        top_k=spec.top_k,
        seed=spec.seed,
        ignore_eos=spec.ignore_eos,
        stop_token_ids=tuple(spec.stop_token_ids),
        logprobs=spec.logprobs,
        prompt_logprobs=spec.prompt_logprobs,
        speculative=spec.speculative,
    )
    return PreparedRequest(request_id, token_ids, sampling, spec.stop)


def _check_chars(count: int, limits: LimitsConfig) -> None:
    if count > limits.max_request_chars:
        raise invalid(
            f"request too large: {count} characters of text (limit {limits.max_request_chars})"
        )


def _check_messages(messages: tuple[ChatMessage, ...], limits: LimitsConfig) -> None:
    if not messages:
        raise invalid("messages is empty")
    if len(messages) > limits.max_messages:
        raise invalid(f"too many messages: {len(messages)} (limit {limits.max_messages})")
    for i, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise invalid(
                f"messages[{i}]: unknown role {message.role!r}; "
                f"expected one of {', '.join(sorted(CHAT_ROLES))}"
            )
    _check_chars(sum(len(m.content) for m in messages), limits)
    if not any(m.content for m in messages):
        raise invalid("every message is empty")


def _check_sampling(spec: SamplingSpec, limits: LimitsConfig) -> None:
    if not (math.isfinite(spec.temperature) and spec.temperature >= 0):
        raise invalid(f"temperature must be a finite number >= 0, got {spec.temperature}")
    if not (math.isfinite(spec.top_p) and 0 <= spec.top_p <= 1):
        raise invalid(f"top_p must be in (0, 1] (0 = disabled), got {spec.top_p}")
    if spec.max_tokens < 0 or spec.top_k < 0:
        raise invalid("max_tokens and top_k must be >= 0")
    if spec.logprobs is not None and not 0 <= spec.logprobs <= MAX_LOGPROBS:
        raise invalid(f"logprobs must be in [0, {MAX_LOGPROBS}] (unset = off), got {spec.logprobs}")
    if len(spec.stop) > limits.max_stop_strings:
        raise invalid(f"too many stop strings: {len(spec.stop)} (limit {limits.max_stop_strings})")
    for stop in spec.stop:
        if not stop or len(stop) > MAX_STOP_STRING_CHARS:
            raise invalid(f"stop strings must have 1 to {MAX_STOP_STRING_CHARS} characters")
