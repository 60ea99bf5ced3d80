"""What the engine hands back: per-step deltas for servers, whole results for batch use."""

from __future__ import annotations

from dataclasses import dataclass

from common.generation import FinishReason
from common.logprobs import TokenLogprob

__all__ = ["CompletionOutput", "StepOutput", "TokenLogprob"]


@dataclass(frozen=True, slots=True)
class StepOutput:
    """One request's progress in one engine step."""

    request_id: str
    new_token_ids: list[int]  # tokens sampled this step (one, or none for an abort)
    finished: bool
    finish_reason: FinishReason | None  # set once finished
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served by the prefix cache
    # One entry per token of new_token_ids when the request asked for logprobs.
    logprobs: list[TokenLogprob] | None = None
    # Set on the request's first output when it asked for prompt_logprobs (prompt_len - 1).
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True, slots=True)
class CompletionOutput:
    """A finished request, as :meth:`engine.LLM.generate` returns it."""

    request_id: str
    token_ids: list[int]  # generated tokens (the prompt excluded)
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    cached_tokens: int
    logprobs: list[TokenLogprob] | None = None  # per generated token, if asked
    prompt_logprobs: list[TokenLogprob] | None = None  # per prompt token after the first
