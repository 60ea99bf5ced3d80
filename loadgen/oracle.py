"""The best prefix-cache hit ratio a workload allows: the yardstick for routing policies.

An ideal cluster behaves like one worker with an unbounded prefix cache of every prompt it
has seen. For each request, in the order the requests were sent, the oracle counts the
leading full blocks of its prompt that an earlier prompt already produced, leaving at least
one token to compute (as the engine does). That is an upper bound for a prefill pool, whose
caches only ever hold prompts; a colocated worker also caches the tokens it generated, so
on multi-turn chats (where a reply becomes part of the next prompt) it can exceed it.

Prompts are tokenized exactly as the router does (the model's chat template), so the
oracle and the server count the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.hashing import block_hashes


@dataclass(frozen=True, slots=True)
class OracleResult:
    prompt_tokens: int
    cached_tokens: int

    @property
    def ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def best_hits(prompts: Sequence[Sequence[int]], block_size: int) -> OracleResult:
    """``prompts`` in the order they were sent."""
    seen: set[int] = set()
    cached = 0
    for token_ids in prompts:
        chain = block_hashes(token_ids, block_size)
        limit = (len(token_ids) - 1) // block_size  # >= 1 token left to compute
        cached += _leading(chain[:limit], seen) * block_size
        seen.update(chain)
    return OracleResult(sum(len(p) for p in prompts), cached)


def _leading(chain: Sequence[int], cache: set[int]) -> int:
    count = 0
    for block_hash in chain:
        if block_hash not in cache:
            break
        count += 1
    return count
