"""Draft-model drafting: a smaller checkpoint with the target's tokenizer proposes k tokens
greedily, running on its own paged KV cache (its own BlockManager, KVCache and
ModelRunner — the engine's pieces, reused; :mod:`engine.speculative.draft_load` builds
them).

Lifecycle of one request's draft state (a shadow :class:`Sequence` keyed by request id,
holding blocks of the *draft* cache only):

    first proposal   prefill the target's tokens into the draft cache (chunked), then
                     k greedy draft steps
    every proposal   roll back to the longest common prefix of what the draft computed and
                     the target's tokens now: the KV of rejected drafts is dropped
                     (``BlockManager.trim``); feed what the draft has not seen (the target's
                     bonus or corrected token, the last accepted draft); k greedy steps
    forget           finish, abort, or fallback to plain decoding: free its blocks

After a proposal the draft has computed the context plus drafts 1..k-1 (the k-th draft's
KV is never needed: if all k are accepted, the next proposal feeds it with the bonus token).

The proposal is greedy — a deterministic function of the context — so the rejection rule
treats it as one-hot (q = 1 at the draft token): sampled output keeps the target's
distribution exactly, as with n-gram drafts.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.sampling import SamplingParams
from engine.block_manager import BlockManager
from engine.model_runner import ModelRunner
from engine.scheduler import ScheduledChunk
from engine.sequence import Sequence, SequenceStatus

_GREEDY = SamplingParams(max_tokens=1, temperature=0.0)  # the draft's own decoding


@dataclass(slots=True)
class _DraftState:
    seq: Sequence  # prompt_token_ids: the tokens the draft holds KV for (computed prefix)
    confirmed: int = 0  # leading tokens known to equal the target's (no need to compare)


class DraftProposer:
    """``proposer(seq, limit) -> drafts`` for :class:`Speculator`, backed by a draft model."""

    def __init__(self, runner: ModelRunner, block_manager: BlockManager, max_chunk: int) -> None:
        self.runner = runner
        self.block_manager = block_manager
        self.max_chunk = max_chunk  # prefill chunk size of the draft (the step token budget)
        self._states: dict[str, _DraftState] = {}

    @property
    def num_tracked(self) -> int:
        """Requests that hold draft state (and draft KV blocks)."""
        return len(self._states)

    def __call__(self, seq: Sequence, limit: int) -> list[int]:
        """Up to ``limit`` greedy draft tokens continuing ``seq``; [] if the draft cache is
        full (the request then decodes plainly this step)."""
        if limit < 1:
            return []
        tokens = seq.all_token_ids
        state = self._states.get(seq.request_id)
        if state is None:
            state = _DraftState(Sequence(seq.request_id, [], _GREEDY, 0))
            state.seq.status = SequenceStatus.RUNNING
            self._states[seq.request_id] = state
        start = self._roll_back(state, tokens)
        draft = state.seq
        draft.prompt_token_ids = tokens
        # Slots for the unseen context and drafts 1..limit-1 (the last draft is not fed).
        if not self.block_manager.append_slots(draft, len(tokens) - start + limit - 1):
            self.forget(seq.request_id)
            return []
        proposed = [self._feed(draft, start)]
        while len(proposed) < limit:
            draft.prompt_token_ids.append(proposed[-1])
            proposed.append(self._feed(draft, len(draft.prompt_token_ids) - 1))
        draft.prompt_token_ids = draft.prompt_token_ids[: draft.num_computed_tokens]
        return proposed

    def forget(self, request_id: str) -> None:
        """Free the request's draft KV blocks (finish, abort, fallback); idempotent."""
        state = self._states.pop(request_id, None)
        if state is not None:
            self.block_manager.free(state.seq)

    def _roll_back(self, state: _DraftState, tokens: list[int]) -> int:
        """Cut the draft back to its longest computed prefix that the target agrees with;
        return that length (the first position to feed). Frees the rolled-back blocks."""
        draft = state.seq
        held = draft.prompt_token_ids
        common = min(state.confirmed, len(tokens))
        limit = min(draft.num_computed_tokens, len(tokens))
        while common < limit and held[common] == tokens[common]:
            common += 1
        # Keep at least one token to feed: its row gives the first draft.
        common = min(common, len(tokens) - 1)
        draft.num_computed_tokens = common
        state.confirmed = common
        self.block_manager.trim(draft)
        return common

    def _feed(self, draft: Sequence, start: int) -> int:
        """Compute the draft's KV for positions [start, len(tokens)) in chunks; return the
        greedy token after the last one."""
        end = len(draft.prompt_token_ids)
        while True:
            size = min(self.max_chunk, end - start)
            last = start + size == end
            chunk = ScheduledChunk(draft, start, size, samples=last)
            sampled = self.runner.execute([chunk])
            draft.num_computed_tokens = start + size
            if last:
                token = sampled[draft.request_id]
                if not isinstance(token, int):
                    raise TypeError(f"draft runner returned {token!r} for a plain chunk")
                return token
            start += size
