"""Acceptance counters, the per-request draft length, and the per-request fallback rule.

Draft length (adaptive k): each request starts drafting ``k`` tokens. After a verify step
that accepted every draft the length about doubles (up to ``k``); after one that rejected
a draft it drops to about one more than the number accepted. Lengths are snapped down to
chunk widths (1 + drafts) that are multiples of ``width_quantum``: a verify chunk's cost
grows in steps, not per token — on this CPU (MKL fp32 GEMM, AVX512) a chunk of 2-3 rows
costs what a 1-row decode does (about 1.1x with the logits), 4-6 rows about 1.8x, 7-9 rows
about 2.3x (``python -m benchmarks.speculative`` measures it), so 2, 5 and 8 drafts are the
lengths worth proposing. A request whose drafts keep failing probes with 2 drafts at about
the cost of a plain decode instead of paying for ``k``.

Fallback: each verify step updates the request's acceptance EWMA
(``ewma = (1 - alpha) * ewma + alpha * accepted / drafted``, starting at 1). Once a request
has been verified ``window`` times and its EWMA is below ``threshold``, it stops
speculating and decodes plainly for ``backoff`` decode steps (16, doubling at each further
fallback), then probes again with a fresh EWMA: speculation that keeps failing costs a
wider forward pass per token and buys nothing, but a request's text can change character
(a preamble, then a copied block), so it is not given up for good.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FALLBACK_WINDOW = 4  # verify steps before the rule may trigger
FALLBACK_THRESHOLD = 0.3  # EWMA of accepted / drafted below which a request falls back
EWMA_ALPHA = 0.3
FALLBACK_BACKOFF = 16  # plain decode steps after the first fallback; doubles each time
VERIFY_WIDTH_QUANTUM = 3  # verify chunk widths worth using are multiples of this (above)


@dataclass(frozen=True, slots=True)
class SpeculativeStats:
    """Engine-wide speculative decoding counters (monotonic since start)."""

    num_draft_tokens: int = 0  # tokens proposed and verified
    num_accepted_tokens: int = 0  # of those, accepted by the target
    num_verify_steps: int = 0  # verify chunks run
    num_fallbacks: int = 0  # times a request fell back to plain decoding

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


@dataclass(slots=True)
class _RequestState:
    ewma: float = 1.0
    steps: int = 0  # verify steps since the last (re)start
    paused: int = 0  # plain decode steps left before it may speculate again
    backoff: int = FALLBACK_BACKOFF  # the next pause's length
    draft_len: int | None = None  # None: the engine's k


@dataclass(slots=True)
class AcceptanceTracker:
    window: int = FALLBACK_WINDOW
    threshold: float = FALLBACK_THRESHOLD
    alpha: float = EWMA_ALPHA
    backoff: int = FALLBACK_BACKOFF
    adaptive: bool = True  # adapt the draft length per request (see the module docstring)
    width_quantum: int = VERIFY_WIDTH_QUANTUM
    _requests: dict[str, _RequestState] = field(default_factory=dict)
    _drafted: int = 0
    _accepted: int = 0
    _steps: int = 0
    _fallbacks: int = 0

    def enabled(self, request_id: str) -> bool:
        """False while the request is paused after a fallback."""
        state = self._requests.get(request_id)
        return state is None or state.paused == 0

    def take_turn(self, request_id: str) -> bool:
        """Called once per decode step of a speculating request: True if it may draft now;
        a paused request counts down its pause instead."""
        state = self._requests.get(request_id)
        if state is None or state.paused == 0:
            return True
        state.paused -= 1
        return False

    def draft_len(self, request_id: str, k: int) -> int:
        """How many drafts the request should propose this step (at most ``k``)."""
        state = self._requests.get(request_id)
        if not self.adaptive or state is None or state.draft_len is None:
            return k
        return min(k, state.draft_len)

    def record(self, request_id: str, drafted: int, accepted: int) -> None:
        """Count one verify step of ``drafted`` tokens, ``accepted`` of them kept."""
        if drafted < 1 or not 0 <= accepted <= drafted:
            raise ValueError(f"bad verify result: {accepted} of {drafted}")
        self._drafted += drafted
        self._accepted += accepted
        self._steps += 1
        state = self._requests.setdefault(request_id, _RequestState(backoff=self.backoff))
        grown = 2 * drafted + 1 if accepted == drafted else accepted + 1
        state.draft_len = _snap(grown, self.width_quantum)
        state.ewma = (1 - self.alpha) * state.ewma + self.alpha * accepted / drafted
        state.steps += 1
        if state.steps >= self.window and state.ewma < self.threshold:
            state.paused, state.backoff = state.backoff, 2 * state.backoff
            state.ewma, state.steps, state.draft_len = 1.0, 0, None
            self._fallbacks += 1

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    @property
    def num_tracked(self) -> int:
        return len(self._requests)

    def stats(self) -> SpeculativeStats:
        return SpeculativeStats(self._drafted, self._accepted, self._steps, self._fallbacks)


def _snap(drafts: int, quantum: int) -> int:
    """The largest draft count <= ``drafts`` whose chunk width (1 + drafts) is a multiple
    of ``quantum``; at least the smallest such count (and at least 1)."""
    snapped = (drafts + 1) // quantum * quantum - 1
    return max(snapped, quantum - 1, 1)
