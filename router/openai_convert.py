"""The HTTP API's one conversion module: OpenAI JSON ↔ :mod:`router.api` dataclasses.

    body ──parse_completion / parse_chat──→ [GenerateInput] (one per choice)
    [Chunk] per choice ──Reply.chunk / Reply.final──→ OpenAI JSON (stream or whole)
    RequestError / ValidationError ──error_reply──→ status + {"error": {...}}

Rules: ``n`` choices of ``p`` prompts are ``p × n`` independent generations, choice
``index = prompt × n + i``, each with ``seed + i`` when a seed is given. ``temperature``
defaults to 1 as in OpenAI's API (0 = greedy); ``max_tokens`` absent = the router's
default. Usage counts each prompt once (its first choice's prompt and cached tokens) and
every choice's completion tokens.

Error codes: 400 INVALID_ARGUMENT (and bad JSON or parameters), 401 bad key, 404
NOT_FOUND, 413 body too large, 429 RESOURCE_EXHAUSTED (``Retry-After``), 503 UNAVAILABLE,
504 DEADLINE_EXCEEDED, 500 INTERNAL.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from common.errors import ErrorCode, RequestError
from common.generation import FinishReason, Usage
from common.logprobs import TokenLogprob
from router.api import ChatMessage, GenerateInput, ModelCard, SamplingSpec
from router.openai_api import ChatCompletionRequest, CompletionRequest
from router.openai_logprobs import LogprobsAccumulator

RETRY_AFTER_S = 1  # what a 429 tells the client to wait when the refusal gave no hint

_STATUS_OF_CODE = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.CANCELLED: 499,
    ErrorCode.INTERNAL: 500,
}
_TYPE_OF_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    503: "service_unavailable_error",
    504: "timeout_error",
}
_CODE_OF_ERROR = {
    ErrorCode.NOT_FOUND: "model_not_found",
    ErrorCode.RESOURCE_EXHAUSTED: "rate_limit_exceeded",
}

# ---- errors ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorReply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def error_reply(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    retry_after_ms: int | None = None,
) -> ErrorReply:
    """A 429 carries ``Retry-After`` (whole seconds, rounded up) and ``retry-after-ms``."""
    error = {
        "message": message,
        "type": _TYPE_OF_STATUS.get(status, "internal_error"),
        "param": param,
        "code": code,
    }
    headers = {}
    if status == 429:
        ms = RETRY_AFTER_S * 1000 if retry_after_ms is None else retry_after_ms
        headers = {"Retry-After": str(max(-(-ms // 1000), 1)), "retry-after-ms": str(ms)}
    return ErrorReply(status, {"error": error}, headers)


def request_error_reply(exc: RequestError) -> ErrorReply:
    return error_reply(
        _STATUS_OF_CODE.get(exc.code, 500),
        exc.message,
        param=getattr(exc, "param", None),
        code=_CODE_OF_ERROR.get(exc.code),
        retry_after_ms=exc.retry_after_ms,
    )


def validation_error_reply(exc: ValidationError) -> ErrorReply:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"] if not isinstance(p, int)) or None
    where = ".".join(str(p) for p in first["loc"])
    return error_reply(400, f"{where}: {first['msg']}" if where else first["msg"], param=param)


def unauthorized() -> ErrorReply:
    return error_reply(
        401,
        "missing or invalid API key (send 'Authorization: Bearer <key>')",
        code="invalid_api_key",
    )


def body_too_large(limit: int) -> ErrorReply:
    return error_reply(413, f"request body larger than {limit} bytes", code="request_too_large")


# ---- requests --------------------------------------------------------------------------------


def parse_completion(body: Any, request_id: str) -> tuple[CompletionRequest, list[GenerateInput]]:
    """The body and one input per choice; ValidationError / RequestError if it is bad."""
    req = CompletionRequest.model_validate(body)
    _refuse_unsupported(req.unsupported())
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompts: list[Any] = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise RequestError(ErrorCode.INVALID_ARGUMENT, "prompt is empty")
    inputs = []
    for p, one in enumerate(prompts):
        for i in range(req.n):
            base = GenerateInput(
                request_id=f"{request_id}-{p * req.n + i}",
                model=req.model,
                sampling=_spec(req, req.max_tokens, i),
                priority=req.priority,
                client_id=req.user or "",
            )
            if isinstance(one, str):
                inputs.append(replace(base, prompt=one))
            else:
                inputs.append(replace(base, token_ids=tuple(one)))
    return req, inputs


def parse_chat(body: Any, request_id: str) -> tuple[ChatCompletionRequest, list[GenerateInput]]:
    req = ChatCompletionRequest.model_validate(body)
    _refuse_unsupported(req.unsupported())
    messages = tuple(
        ChatMessage("system" if m.role == "developer" else m.role, m.text) for m in req.messages
    )
    inputs = [
        GenerateInput(
            request_id=f"{request_id}-{i}",
            model=req.model,
            messages=messages,
            sampling=_spec(req, req.token_limit, i),
            priority=req.priority,
            client_id=req.user or "",
        )
        for i in range(req.n)
    ]
    return req, inputs


def _spec(
    req: CompletionRequest | ChatCompletionRequest, limit: int | None, i: int
) -> SamplingSpec:
    return SamplingSpec(
        max_tokens=limit or 0,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=req.top_p or 0.0,
        top_k=req.top_k or 0,
        seed=None if req.seed is None else req.seed + i,
        stop=req.stop_strings,
        ignore_eos=req.ignore_eos,
        logprobs=req.logprobs_k,
    )


def _refuse_unsupported(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise UnsupportedParameter(*problems[0])


class UnsupportedParameter(RequestError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(ErrorCode.INVALID_ARGUMENT, message)
        self.param = param


# ---- replies ---------------------------------------------------------------------------------


def finish_reason(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value


def usage_json(usages: Sequence[Usage | None], n: int) -> dict[str, Any]:
    """Totals over the choices: each prompt once (every n-th choice starts a prompt)."""
    firsts = [u for u in usages[::n] if u is not None]
    prompt = sum(u.prompt_tokens for u in firsts)
    completion = sum(u.completion_tokens for u in usages if u is not None)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in firsts)},
    }


@dataclass(frozen=True, slots=True)
class ChoiceResult:
    """One finished choice of a non-streamed reply."""

    text: str
    finish_reason: FinishReason | None
    usage: Usage | None
    logprobs: LogprobsAccumulator | None = None  # when the request asked


class Reply:
    """The JSON of one completion (``chat=False``) or chat completion's reply."""

    def __init__(
        self, chat: bool, reply_id: str, model: str, created: int, logprobs: bool = False
    ) -> None:
        self.chat = chat
        self.id = reply_id
        self.model = model
        self.created = created
        self.logprobs = logprobs  # the request asked: every choice carries a logprobs object
        self._streamed: dict[int, LogprobsAccumulator] = {}  # per choice, for text offsets

    def accumulator(self) -> LogprobsAccumulator | None:
        """A fresh per-choice collector when the request asked for log-probs."""
        return LogprobsAccumulator(self.chat) if self.logprobs else None

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(
        self,
        index: int,
        text: str,
        reason: FinishReason | None,
        *,
        first: bool = False,
        logprobs: Sequence[TokenLogprob] | None = None,
        texts: dict[int, str] | None = None,
    ) -> dict[str, Any]:
        """One streamed event's body (``usage: null`` as OpenAI sends with include_usage);
        ``logprobs`` are this chunk's tokens' (with their ``texts``)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {}
            if text and not first:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": text, "logprobs": None}
            obj = "text_completion"
        if self.logprobs:
            acc = self._streamed.setdefault(index, LogprobsAccumulator(self.chat))
            choice["logprobs"] = acc.json(logprobs or (), texts or {})
        choice["finish_reason"] = finish_reason(reason)
        return {**self._head(obj), "choices": [choice], "usage": None}

    def usage_chunk(self, usages: Sequence[Usage | None], n: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage_json(usages, n)}

    def final(self, choices: Sequence[ChoiceResult], n: int) -> dict[str, Any]:
        out = []
        for index, c in enumerate(choices):
            if self.chat:
                body: dict[str, Any] = {"message": {"role": "assistant", "content": c.text}}
            else:
                body = {"text": c.text}
            reason = finish_reason(c.finish_reason)
            logprobs = c.logprobs.whole() if c.logprobs is not None else None
            out.append({"index": index, **body, "logprobs": logprobs, "finish_reason": reason})
        obj = "chat.completion" if self.chat else "text_completion"
        usage = usage_json([c.usage for c in choices], n)
        return {**self._head(obj), "choices": out, "usage": usage}


def models_json(cards: Iterable[ModelCard]) -> dict[str, Any]:
    """``GET /v1/models``: one entry per model name, with the pools serving it."""
    by_name: dict[str, list[ModelCard]] = {}
    for card in cards:
        by_name.setdefault(card.name, []).append(card)
    data = [
        {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "pdserve",
            "pools": [c.pool for c in group],
            "max_model_len": max(c.context_length for c in group),
        }
        for name, group in by_name.items()
    ]
    return {"object": "list", "data": data}
