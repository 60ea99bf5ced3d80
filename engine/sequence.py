"""Request state inside the engine: one ``Sequence`` per request.

Lifecycle: WAITING (queued, maybe partly prefilled or preempted) → RUNNING (has blocks,
scheduled every step) → FINISHED (blocks released). Preemption moves a RUNNING sequence
back to WAITING with its blocks freed and ``num_computed_tokens`` reset: its prompt and
already generated tokens are recomputed when it is scheduled again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from common.generation import FinishReason
from common.logprobs import TokenLogprob
from common.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # monotonic admission order; FIFO fairness sorts on it
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)  # physical block ids, in order
    num_computed_tokens: int = 0  # tokens whose KV is already in the cache
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache (first admission)
    finish_reason: FinishReason | None = None
    # Keep the KV blocks after finishing, until the scheduler's release(): the prefill side
    # of a disaggregated request must still send them.
    hold_blocks: bool = False
    # prompt_logprobs[i] is the log-prob of prompt token i + 1 (filled chunk by chunk, when
    # the request asked for them); prompt_logprobs_sent once an output has carried them.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs_sent: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
