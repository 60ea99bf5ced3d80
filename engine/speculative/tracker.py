"""Acceptance counters and the per-request fallback rule.

Fallback: each verify step updates the request's acceptance EWMA
(``ewma = (1 - alpha) * ewma + alpha * accepted / drafted``, starting at 1). Once a request
has been verified ``window`` times and its EWMA is below ``threshold``, it stops
speculating and decodes plainly for the rest of its life: speculation that keeps failing
costs a wider forward pass per token and buys nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FALLBACK_WINDOW = 4  # verify steps before the rule may trigger
FALLBACK_THRESHOLD = 0.3  # EWMA of accepted / drafted below which a request falls back
EWMA_ALPHA = 0.3


@dataclass(frozen=True, slots=True)
class SpeculativeStats:
    """Engine-wide speculative decoding counters (monotonic since start)."""

    num_draft_tokens: int = 0  # tokens proposed and verified
    num_accepted_tokens: int = 0  # of those, accepted by the target
    num_verify_steps: int = 0  # verify chunks run
    num_fallbacks: int = 0  # requests that fell back to plain decoding

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


@dataclass(slots=True)
class _RequestState:
    ewma: float = 1.0
    steps: int = 0
    disabled: bool = False


@dataclass(slots=True)
class AcceptanceTracker:
    window: int = FALLBACK_WINDOW
    threshold: float = FALLBACK_THRESHOLD
    alpha: float = EWMA_ALPHA
    _requests: dict[str, _RequestState] = field(default_factory=dict)
    _drafted: int = 0
    _accepted: int = 0
    _steps: int = 0
    _fallbacks: int = 0

    def enabled(self, request_id: str) -> bool:
        """False once the request fell back to plain decoding."""
        state = self._requests.get(request_id)
        return state is None or not state.disabled

    def record(self, request_id: str, drafted: int, accepted: int) -> None:
        """Count one verify step of ``drafted`` tokens, ``accepted`` of them kept."""
        if drafted < 1 or not 0 <= accepted <= drafted:
            raise ValueError(f"bad verify result: {accepted} of {drafted}")
        self._drafted += drafted
        self._accepted += accepted
        self._steps += 1
        state = self._requests.setdefault(request_id, _RequestState())
        state.ewma = (1 - self.alpha) * state.ewma + self.alpha * accepted / drafted
        state.steps += 1
        if not state.disabled and state.steps >= self.window and state.ewma < self.threshold:
            state.disabled = True
            self._fallbacks += 1

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    @property
    def num_tracked(self) -> int:
        return len(self._requests)

    def stats(self) -> SpeculativeStats:
        return SpeculativeStats(self._drafted, self._accepted, self._steps, self._fallbacks)
