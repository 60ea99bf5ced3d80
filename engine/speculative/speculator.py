"""Policy: which running sequence speculates this step, and its draft tokens.

The scheduler asks :meth:`Speculator.propose` for each running sequence that has exactly
one token left to compute (a decode). A sequence speculates unless the request opted out
(``SamplingParams.speculative=False``), asked for ``logprobs`` (those are reported per
sampled token, so such requests simply decode plainly), or is paused after a fallback; the
tracker also picks how many drafts it proposes (adaptive k; see
:mod:`engine.speculative.tracker`). The number of drafts is capped by the caller so that
accepting all of them could not overrun ``max_tokens`` or the context length. A proposer
that finds nothing (no n-gram match) returns [] and the step is a plain decode.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.sequence import Sequence
from engine.speculative.ngram import propose_ngram
from engine.speculative.tracker import AcceptanceTracker, SpeculativeStats

Proposer = Callable[[Sequence, int], list[int]]  # (sequence, max drafts) -> drafts


class Speculator:
    def __init__(
        self,
        num_speculative_tokens: int,
        proposer: Proposer,
        on_forget: Callable[[str], None] | None = None,
    ) -> None:
        self.k = num_speculative_tokens
        self.proposer = proposer
        self._on_forget = on_forget  # a draft model drops the request's draft KV here
        self.tracker = AcceptanceTracker()

    @classmethod
    def ngram(cls, k: int, min_n: int, max_n: int) -> Speculator:
        """Prompt lookup over the request's prompt and output tokens."""

        def propose(seq: Sequence, limit: int) -> list[int]:
            return propose_ngram(seq.all_token_ids, limit, min_n, max_n)

        return cls(k, propose)

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        """At most ``min(k, limit)`` draft tokens for ``seq``; [] to decode plainly.

        Called once per decode step of each running sequence: a paused (fallen back)
        request counts its pause down here; the tracker picks the request's draft length.
        """
        params = seq.params
        if params.speculative is False or params.logprobs is not None:
            return []
        if not self.tracker.take_turn(seq.request_id):
            return []
        limit = min(self.tracker.draft_len(seq.request_id, self.k), limit)
        if limit < 1:
            return []
        return self.proposer(seq, limit)[:limit]

    def record(self, request_id: str, drafted: int, accepted: int) -> None:
        self.tracker.record(request_id, drafted, accepted)
        if self._on_forget is not None and not self.tracker.enabled(request_id):
            self._on_forget(request_id)  # fell back: its draft KV is no longer needed

    def forget(self, request_id: str) -> None:
        self.tracker.forget(request_id)
        if self._on_forget is not None:
            self._on_forget(request_id)

    def stats(self) -> SpeculativeStats:
        return self.tracker.stats()
