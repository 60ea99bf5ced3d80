"""The OpenAI HTTP API's request bodies, as pydantic models.

``POST /v1/completions`` is :class:`CompletionRequest`, ``POST /v1/chat/completions``
:class:`ChatCompletionRequest`. Fields we do not know are ignored (clients and load
generators send vendor extras); fields we know but do not implement are refused with a
400 that names them (:meth:`unsupported`) rather than silently ignored. Extensions, as in
vLLM / SGLang: ``top_k``, ``ignore_eos``, ``priority`` (0 = normal .. 9; unlike vLLM's,
*higher* is admitted first).

:mod:`router.openai_convert` turns a parsed body into :class:`router.api.GenerateInput`\\ s
and results back into response JSON.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # alternatives per token (common.sampling.MAX_LOGPROBS)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str = ""
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extension
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # the caller's id for fair sharing, unless X-Client-Id is sent
    priority: int = Field(0, ge=0, le=9)  # extension: admission order, higher first
    ignore_eos: bool = False  # extension
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, why) of each field set to something we cannot do (yet)."""
        out = []
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                out.append((name, f"{name} is not supported"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported"))
        return out

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def logprobs_k(self) -> int | None:
        """Alternatives per generated token to return; None = no log-probs."""
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.echo:
            out.append(("echo", "echo is not supported"))
        if self.suffix:
            out.append(("suffix", "suffix is not supported"))
        if self.best_of not in (None, self.n):
            out.append(("best_of", "best_of other than n is not supported"))
        return out

    @property
    def logprobs_k(self) -> int | None:
        return self.logprobs


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            out.append(("top_logprobs", "top_logprobs requires logprobs: true"))
        if self.tools:
            out.append(("tools", "tools are not supported"))
        if self.response_format and self.response_format.get("type") != "text":
            out.append(("response_format", "only response_format {'type': 'text'} is supported"))
        return out

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        """``max_completion_tokens`` (the newer name) wins over ``max_tokens``."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens
