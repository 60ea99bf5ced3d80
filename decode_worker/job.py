"""What crosses between the DecodeWorker servicer and the request lifecycle: a request in,
token deltas out. The servicer translates these to and from proto; nothing else does."""

from __future__ import annotations

from dataclasses import dataclass

from common.sampling import SamplingParams
from engine.sequence import FinishReason


@dataclass(frozen=True, slots=True)
class PrefillTarget:
    worker_id: str
    grpc_address: str


@dataclass(frozen=True, slots=True)
class DecodeJob:
    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    prefill: PrefillTarget | None  # None: prefill on this worker
    deadline: float | None = None  # time.monotonic() by which the client gives up


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """One streamed message: tokens since the previous one; usage on the first and the last
    (completion tokens so far), the finish reason on the last."""

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    prefilled_by: str = ""  # set on the first message only
