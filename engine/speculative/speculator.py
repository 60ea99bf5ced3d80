"""Policy: which running sequence speculates this step, and its draft tokens.

The scheduler asks :meth:`Speculator.propose` for each running sequence that has exactly
one token left to compute (a decode). A sequence speculates unless the request opted out
(``SamplingParams.speculative=False``), asked for ``logprobs`` (those are reported per
sampled token, so such requests simply decode plainly), or fell back (see
:mod:`engine.speculative.tracker`). The number of drafts is capped by the caller so that
accepting all of them could not overrun ``max_tokens`` or the context length.
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

    def wants(self, seq: Sequence) -> bool:
        params = seq.params
        return (
            params.speculative is not False
            and params.logprobs is None
            and self.tracker.enabled(seq.request_id)
        )

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        """At most ``min(k, limit)`` draft tokens for ``seq``; [] to decode plainly."""
        limit = min(self.k, limit)
        if limit < 1 or not self.wants(seq):
            return []
        return self.proposer(seq, limit)[:limit]

    def record(self, request_id: str, drafted: int, accepted: int) -> None:
        self.tracker.record(request_id, drafted, accepted)

    def forget(self, request_id: str) -> None:
        self.tracker.forget(request_id)
        if self._on_forget is not None:
            self._on_forget(request_id)

    def stats(self) -> SpeculativeStats:
        return self.tracker.stats()
