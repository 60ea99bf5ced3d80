"""Continuous-batching scheduler: which sequences run this step, and how many tokens each.

Queues: waiting (FIFO by arrival: new and preempted sequences, holding no blocks)
→ running (hold KV blocks, scheduled every step) → finished (blocks released, returned).

The contract is two calls per engine step, as in vLLM v1:

    out = scheduler.schedule()                         # pick chunks, reserve KV slots
    sampled = runner.execute(out)                      # {request_id: token} where chunk.samples
    finished = scheduler.update_from_output(out, sampled)  # advance, cache, stop, free

Per step at most ``max_num_batched_tokens`` tokens are computed and at most
``max_num_seqs`` sequences run. The budget is handed out in two passes, each in arrival
order; :class:`PrefillPolicy` decides the chunk sizes, the scheduler only applies them:

1. Running sequences: a decode costs one token (the KV of the token sampled last step), a
   prefill takes its next chunk, capped at ``long_prefill_token_threshold`` tokens. Then
   waiting sequences are admitted the same way — except that a *long* one (more tokens to
   compute than the threshold) is passed over while another long prefill is in progress.
2. The leftover budget tops up the capped chunks, then admits waiting sequences uncapped.

So a short prompt arriving while a long one is chunk-prefilled runs in the next step,
beside a chunk of the long one, instead of after all its chunks; the long one still
progresses every step, and long prompts start in FIFO order, one at a time. When nothing
short is waiting this is exactly the FIFO schedule (the top-up restores every cap).

When a running sequence cannot get a KV block, the most recently arrived running sequence
is preempted by recompute: its blocks are freed and it goes back to the front of waiting,
keeping its generated tokens, which are re-prefilled together with the prompt. No waiting
sequence is admitted on a step that preempted, since blocks are short; otherwise the first
one that does not fit stops admission, so a long prompt is never starved of blocks by
shorter ones queued behind it.

Disaggregation adds two entry points. ``add_prefilled`` puts a sequence whose prompt KV
already sits in blocks it owns (landed by a KV transfer) straight into running.
A sequence created with ``hold_blocks`` keeps its blocks when it finishes, in ``held``,
until ``release`` — the prefill worker sends them in between.

A sequence stops with LENGTH at ``max_model_len`` tokens, or earlier if its KV would
outgrow the whole cache (no amount of preemption could make room for it).

Device-free and deterministic: the same calls produce the same schedules.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.generation import FinishReason
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.prefill_policy import PrefillPolicy
from engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from engine.speculative import Speculator


@dataclass(slots=True)
class ScheduledChunk:
    """One sequence's share of a step: compute KV for positions [start, start + num_tokens)."""

    seq: Sequence  # the request; its block_table already has slots for this chunk
    start: int  # first position to compute (= seq.num_computed_tokens at schedule time)
    num_tokens: int  # positions to compute this step (1 for a decode)
    samples: bool  # chunk reaches the seq's last token: the model must sample a next token
    # A verify chunk (speculative decoding): the seq's last token then these drafts, so
    # num_tokens == 1 + len(draft_token_ids); the runner returns the accepted tokens.
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        """The input tokens of this chunk."""
        known = self.num_tokens - len(self.draft_token_ids)
        return self.seq.all_token_ids[self.start : self.start + known] + self.draft_token_ids


@dataclass(slots=True)
class SchedulerOutput:
    """What the model runs this step; hand it back unchanged to update_from_output."""

    scheduled: list[ScheduledChunk] = field(default_factory=list)  # running first, then new
    preempted: list[str] = field(default_factory=list)  # request ids whose KV was dropped
    num_batched_tokens: int = 0  # sum of chunk.num_tokens, <= max_num_batched_tokens


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        speculator: Speculator | None = None,
    ) -> None:
        if block_manager.block_size != config.block_size:
            raise ValueError("block manager and config disagree on block_size")
        self.config = config
        self.policy = PrefillPolicy(config.long_prefill_token_threshold)
        self.block_manager = block_manager
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.speculator = speculator  # None: no speculative decoding
        # A sequence stops (LENGTH) once its next decode would need more KV slots than the
        # whole cache holds: alone it could never get them, and it would preempt itself
        # forever. So the effective context length is capped by the cache's capacity.
        capacity = block_manager.num_blocks * block_manager.block_size
        self.max_len = min(max_model_len, capacity + 1)
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # arrival order; the tail is preempted first
        self._requests: dict[str, Sequence] = {}  # every unfinished sequence, by id
        # Preempted sequences keep num_cached_tokens from their first admission (it is
        # what the request saved, reported to the client), not the re-admission's hit.
        self._preempted: set[str] = set()
        self._held: dict[str, Sequence] = {}  # finished, blocks kept until release()

    # ---- queues ---------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_held(self) -> int:
        return len(self._held)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def add_prefilled(self, seq: Sequence) -> bool:
        """Run a sequence whose prompt KV is already in ``seq.block_table`` (it owns those
        blocks) and whose first token was sampled elsewhere. Returns True if that token
        already finished it (its blocks are then freed)."""
        if seq.request_id in self._requests:
            raise ValueError(f"duplicate request id {seq.request_id!r}")
        needed = -(-seq.num_prompt_tokens // self.block_manager.block_size)
        if len(seq.output_token_ids) != 1 or len(seq.block_table) != needed:
            raise ValueError(f"{seq.request_id}: needs one first token and {needed} blocks")
        if not 0 < seq.num_prompt_tokens < self.max_len:
            raise ValueError(f"{seq.request_id}: prompt of {seq.num_prompt_tokens} tokens")
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.status = SequenceStatus.RUNNING
        self._requests[seq.request_id] = seq
        self._running.append(seq)
        self.block_manager.commit_computed(seq)
        reason = self._stop_reason(seq, seq.output_token_ids[0])
        if reason is not None:
            self._finish(seq, reason)
        return reason is not None

    def release(self, request_id: str) -> bool:
        """Free the blocks a finished ``hold_blocks`` sequence kept; False if none held."""
        seq = self._held.pop(request_id, None)
        if seq is None:
            return False
        self.block_manager.free(seq)
        return True

    def add(self, seq: Sequence) -> None:
        """Queue a new request; ValueError if its prompt could never run."""
        if seq.request_id in self._requests:
            raise ValueError(f"duplicate request id {seq.request_id!r}")
        if seq.status is not SequenceStatus.WAITING or seq.block_table:
            raise ValueError(f"{seq.request_id}: only fresh waiting sequences can be added")
        if not 0 < seq.num_tokens < self.max_len:
            raise ValueError(
                f"{seq.request_id}: prompt has {seq.num_tokens} tokens; it needs 1 to "
                f"{self.max_len - 1} (max_model_len {self.max_model_len}, KV cache "
                f"{self.block_manager.num_blocks * self.block_manager.block_size} tokens)"
            )
        self._requests[seq.request_id] = seq
        self._waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a request as ABORT and free its blocks; None if it is unknown or done."""
        if self.release(request_id):
            return None
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return None
        if seq in self._running:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        self._preempted.discard(request_id)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = FinishReason.ABORT
        return seq

    # ---- step, part 1 -----------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            budget = self._admit_waiting(out, budget, first_pass=True)
        budget = self._top_up(out, budget)
        if budget and self.policy.threshold and not out.preempted:
            self._admit_waiting(out, budget, first_pass=False)
        out.num_batched_tokens = sum(chunk.num_tokens for chunk in out.scheduled)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self._running) and budget > 0:
            seq = self._running[i]
            num_tokens = self.policy.first_chunk(seq.num_tokens - seq.num_computed_tokens, budget)
            verify = self._verify_chunk(seq, budget)
            if verify is not None:
                out.scheduled.append(verify)
                budget -= verify.num_tokens
                i += 1
                continue
            while not self.block_manager.append_slots(seq, num_tokens):
                victim = self._running[-1]  # most recent arrival; never one already scheduled
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is seq:
                    return budget
            out.scheduled.append(self._chunk(seq, num_tokens))
            budget -= num_tokens
            i += 1
        return budget

    def _verify_chunk(self, seq: Sequence, budget: int) -> ScheduledChunk | None:
        """A decode widened by draft tokens, if the speculator proposes any and they fit.

        Drafts are capped so that accepting all of them (plus the bonus token) stays within
        ``max_tokens`` and the context length. If their KV slots are not free the sequence
        decodes plainly instead (no preemption for speculation)."""
        if self.speculator is None or seq.num_tokens - seq.num_computed_tokens != 1:
            return None
        limit = min(
            budget - 1,
            seq.params.max_tokens - len(seq.output_token_ids) - 1,
            self.max_len - seq.num_tokens - 1,
        )
        drafts = self.speculator.propose(seq, limit) if limit > 0 else []
        if not drafts or not self.block_manager.append_slots(seq, 1 + len(drafts)):
            return None
        start = seq.num_computed_tokens
        return ScheduledChunk(seq, start, 1 + len(drafts), True, list(drafts))

    def _admit_waiting(self, out: SchedulerOutput, budget: int, first_pass: bool) -> int:
        """Admit in FIFO order; the first pass caps chunks and passes over long prompts."""
        long_in_progress = any(self.policy.is_long(self._remaining(s)) for s in self._running)
        for seq in list(self._waiting):
            if budget == 0 or len(self._running) >= self.config.max_num_seqs:
                break
            if first_pass and not self.policy.may_admit(self._uncached(seq), long_in_progress):
                continue
            cached_before = seq.num_cached_tokens
            self.block_manager.allocate_prefix(seq)
            if seq.request_id in self._preempted:
                seq.num_cached_tokens = cached_before
            remaining = self._remaining(seq)
            num_tokens = self.policy.first_chunk(remaining, budget) if first_pass else budget
            num_tokens = min(num_tokens, remaining)
            if not self.block_manager.append_slots(seq, num_tokens):
                # Give the borrowed prefix back; FIFO: nobody behind it may jump ahead.
                self.block_manager.free(seq)
                seq.num_computed_tokens = 0
                seq.num_cached_tokens = cached_before
                break
            self._waiting.remove(seq)
            self._preempted.discard(seq.request_id)
            seq.status = SequenceStatus.RUNNING
            self._running.append(seq)
            out.scheduled.append(self._chunk(seq, num_tokens))
            budget -= num_tokens
            long_in_progress = long_in_progress or self.policy.is_long(remaining)
        return budget

    def _top_up(self, out: SchedulerOutput, budget: int) -> int:
        """Grow capped chunks with the leftover budget, in arrival order; no preemption."""
        for i, chunk in enumerate(out.scheduled):
            extra = min(self._remaining(chunk.seq) - chunk.num_tokens, budget)
            if extra > 0 and self.block_manager.append_slots(chunk.seq, chunk.num_tokens + extra):
                out.scheduled[i] = self._chunk(chunk.seq, chunk.num_tokens + extra)
                budget -= extra
        return budget

    @staticmethod
    def _remaining(seq: Sequence) -> int:
        return seq.num_tokens - seq.num_computed_tokens

    def _uncached(self, seq: Sequence) -> int:
        """Tokens a waiting seq would compute once admitted (its prefix-cache hit excluded)."""
        if not self.policy.is_long(seq.num_tokens):  # short either way: skip the hashing
            return seq.num_tokens
        return seq.num_tokens - self.block_manager.match_prefix(seq)

    def _preempt(self, seq: Sequence) -> None:
        # Victims are taken newest first, so pushing each to the front keeps waiting in
        # arrival order, ahead of everything that arrived after them.
        self._running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self._preempted.add(seq.request_id)
        self._waiting.appendleft(seq)

    @staticmethod
    def _chunk(seq: Sequence, num_tokens: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        return ScheduledChunk(seq, start, num_tokens, start + num_tokens == seq.num_tokens)

    # ---- step, part 2 -----------------------------------------------------------------

    def update_from_output(
        self, output: SchedulerOutput, sampled: dict[str, int] | dict[str, int | list[int]]
    ) -> list[Sequence]:
        """Apply a step's results; return the sequences that finished in it.

        ``sampled`` maps request id -> token for every chunk with ``samples`` set (a verify
        chunk's value is the list of its accepted tokens). Chunks of sequences aborted while
        the step ran are ignored.
        """
        finished: list[Sequence] = []
        for chunk in output.scheduled:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if seq.num_computed_tokens != chunk.start:
                raise ValueError(f"{seq.request_id}: output applied twice or out of order")
            if chunk.draft_token_ids:
                if self._apply_verified(chunk, sampled):
                    finished.append(seq)
                continue
            seq.num_computed_tokens += chunk.num_tokens
            self.block_manager.commit_computed(seq)
            if not chunk.samples:
                continue
            if seq.request_id not in sampled:
                raise KeyError(f"no sampled token for {seq.request_id}")
            token = sampled[seq.request_id]
            seq.output_token_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def _apply_verified(
        self, chunk: ScheduledChunk, sampled: dict[str, int] | dict[str, int | list[int]]
    ) -> bool:
        """Append a verify chunk's accepted tokens in order, stopping at the first stop.

        Each appended token makes the KV of the input before it valid, so the computed
        length grows by the number kept; the KV written for rejected drafts is beyond it,
        and the blocks that only held such positions are freed (rolled back). Returns True
        if the sequence finished.
        """
        seq = chunk.seq
        tokens = sampled.get(seq.request_id)
        if not isinstance(tokens, list) or not 1 <= len(tokens) <= chunk.num_tokens:
            raise KeyError(f"no verified tokens for {seq.request_id}")
        if self.speculator is not None:
            self.speculator.record(seq.request_id, len(chunk.draft_token_ids), len(tokens) - 1)
        reason = None
        for token in tokens:
            seq.output_token_ids.append(token)
            seq.num_computed_tokens += 1
            reason = self._stop_reason(seq, token)
            if reason is not None:
                break
        self.block_manager.trim(seq)
        self.block_manager.commit_computed(seq)
        if reason is not None:
            self._finish(seq, reason)
        return reason is not None

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        if token in self.eos_token_ids and not seq.params.ignore_eos:
            return FinishReason.STOP
        if token in seq.params.stop_token_ids:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= seq.params.max_tokens:
            return FinishReason.LENGTH
        if seq.num_tokens >= self.max_len:  # max_model_len or the whole KV cache
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self._running.remove(seq)
        del self._requests[seq.request_id]
        if seq.hold_blocks:
            self._held[seq.request_id] = seq
        else:
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
