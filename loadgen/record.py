"""What the client measured of one request: the unit every summary and plot is built from.

Times are seconds from the start of the run (``time.perf_counter()`` minus the run's
start). A *chunk* is one streamed message carrying new tokens; ITL is the gap between
consecutive chunks (a chunk of several tokens is one gap, as the user sees it).

A *refusal* is the server's overload answer: RESOURCE_EXHAUSTED (gRPC) or HTTP 429 before
any token. It is recorded apart from errors (``refused``, not ``error``), with its latency
(``refusal_s``: sent to answered) and the retry hint the server gave (``retry-after-ms``
trailing metadata; ``Retry-After`` seconds or ``retry-after-ms`` headers over HTTP): fast,
clear refusals are what overload control is for, so they are measured, not failures.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One turn as sent: the target turns it into a gRPC GenerateRequest or HTTP body."""

    request_id: str
    messages: list[dict[str, str]]
    max_tokens: int
    ignore_eos: bool = True  # fixed output lengths (servers that do not know it ignore it)


@dataclass(slots=True)
class RequestRecord:
    session_id: str
    turn: int
    group: str
    scheduled_s: float  # when the workload wanted it sent
    sent_s: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    end_s: float = 0.0
    prompt_tokens: int = 0  # from the server's usage (0 if it sent none)
    cached_tokens: int | None = None  # None: the server does not report it
    output_tokens: int = 0  # usage.completion_tokens, else the streamed count
    finish_reason: str = ""
    error: str = ""  # "" on success, else a status name (UNAVAILABLE, HTTP_503, TIMEOUT...)
    refused: bool = False  # the server refused it for overload (not an error)
    retry_after_s: float | None = None  # a refusal's retry hint, when the server sent one
    route: str = ""  # prefill→decode worker ids when the server reports them
    reply: str = ""  # generated text (multi-turn replays it); not written to JSON

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.chunk_times)

    @property
    def failed(self) -> bool:
        """Neither completed nor refused: an error, a timeout, or a stream with no token."""
        return not self.ok and not self.refused

    @property
    def refusal_s(self) -> float | None:
        """How long the refusal took to arrive (sent to answered)."""
        return self.end_s - self.sent_s if self.refused else None

    def refuse(self, retry_after_s: float | None) -> None:
        self.refused, self.error, self.retry_after_s = True, "", retry_after_s

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times[0] - self.sent_s if self.chunk_times else None

    @property
    def e2e_s(self) -> float | None:
        return self.end_s - self.sent_s if self.ok else None

    @property
    def itls_s(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.chunk_times)]

    @property
    def tpot_s(self) -> float | None:
        """(last chunk - first chunk) / (output tokens - 1): decode time per token."""
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.output_tokens - 1)

    @property
    def queue_delay_s(self) -> float:
        """How late the client sent it (a closed loop or an overloaded client)."""
        return max(0.0, self.sent_s - self.scheduled_s)

    def add_chunk(self, at_s: float, tokens: int) -> None:
        self.chunk_times.append(at_s)
        self.chunk_tokens.append(tokens)

    def to_json(self) -> dict[str, Any]:
        return {
            "session": self.session_id,
            "turn": self.turn,
            "group": self.group,
            "scheduled_s": round(self.scheduled_s, 6),
            "sent_s": round(self.sent_s, 6),
            "end_s": round(self.end_s, 6),
            "ttft_s": _round(self.ttft_s),
            "tpot_s": _round(self.tpot_s),
            "itls_s": [round(x, 6) for x in self.itls_s],
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "output_tokens": self.output_tokens,
            "finish_reason": self.finish_reason,
            "error": self.error,
            "refused": self.refused,
            "refusal_s": _round(self.refusal_s),
            "retry_after_s": self.retry_after_s,
            "route": self.route,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
