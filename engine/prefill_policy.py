"""How a scheduler step sizes prefill chunks, so short prompts are not stuck behind long ones.

Pure policy: :class:`engine.scheduler.Scheduler` applies it (see its docstring for the two
passes). A prefill is *long* while more than ``threshold`` of its tokens remain to be
computed (``EngineConfig.long_prefill_token_threshold``); in the first pass a long prefill's
chunk is capped at ``threshold`` and long prompts start one at a time, so the rest of the
budget admits short prompts in the same step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PrefillPolicy:
    """How a step's first pass sizes prefill chunks; pure, so it can be tested alone.

    A prefill is *long* while more than ``threshold`` of its tokens remain to be computed;
    ``threshold`` 0 makes none long, which is plain FIFO chunking.
    """

    threshold: int

    def is_long(self, remaining: int) -> bool:
        return 0 < self.threshold < remaining

    def first_chunk(self, remaining: int, budget: int) -> int:
        """Tokens a prefill with ``remaining`` tokens left gets in the first pass."""
        cap = self.threshold if self.is_long(remaining) else remaining
        return min(cap, budget)

    def may_admit(self, remaining: int, long_in_progress: bool) -> bool:
        """Whether the first pass admits a waiting prompt: long ones start one at a time."""
        return not (long_in_progress and self.is_long(remaining))
