"""Where the KV transfer benchmark's block ids come from: the engine's own ``BlockManager``,
driven the way each side of a disaggregated pair drives it.

* :class:`PrefillSide` — a prefill worker's cache: prompts prefilled in chunks with the
  prefix cache on, some opening with a shared system prompt, released once their KV is
  sent (their full blocks stay cached until evicted). A transfer sends all of a prompt's
  blocks, the cached prefix included.
* :class:`DecodeSide` — a decode worker's cache: reservations for incoming prompts (the raw
  API), each held while its request decodes, released in random order.

Both are warmed up by ``warmup`` requests, so every block has been handed out many times:
a steady state, not a fresh cache. ``contiguous_ids`` / ``scattered_ids`` are the two
extremes the benchmark shows beside them.
"""

from __future__ import annotations

import random

from common.sampling import SamplingParams
from engine.block_manager import RUN_EVICTION_MIN_BLOCKS, BlockManager
from engine.sequence import Sequence
from kv_transfer.segments import long_runs

BLOCK_SIZE = 16
CHUNK_TOKENS = 512  # the engine's long_prefill_token_threshold
SHARED_PREFIXES = 8  # distinct system prompts
VOCAB = 49_152  # SmolLM2


class PrefillSide:
    """A prefill worker's prefix-caching cache; :meth:`draw` prefills one more prompt."""

    def __init__(
        self,
        num_blocks: int,
        rng: random.Random,
        warmup: int = 1000,
        run_eviction_min_blocks: int = RUN_EVICTION_MIN_BLOCKS,
    ) -> None:
        self._manager = BlockManager(
            num_blocks, BLOCK_SIZE, run_eviction_min_blocks=run_eviction_min_blocks
        )
        self._rng = rng
        self._count = 0
        self.last_cached_blocks = 0  # of the last draw: its leading prefix-cache hits
        self._prefixes = [
            [rng.randrange(VOCAB) for _ in range(512)] for _ in range(SHARED_PREFIXES)
        ]
        for _ in range(warmup):
            self.draw(rng.randint(1, 64))  # 16 to 1024 tokens

    def draw(self, n: int) -> tuple[int, ...]:
        """The block ids of a fresh prompt of ``n`` full blocks, prefilled and released."""
        tokens = self._prompt(n)
        self._count += 1
        seq = Sequence(f"prompt-{self._count}", tokens, SamplingParams(), arrival=0)
        self._manager.allocate_prefix(seq)
        self.last_cached_blocks = seq.num_cached_tokens // BLOCK_SIZE
        while seq.num_computed_tokens < len(tokens):
            step = min(CHUNK_TOKENS, len(tokens) - seq.num_computed_tokens)
            if not self._manager.append_slots(seq, step):
                raise RuntimeError(f"a {n}-block prompt does not fit the prefill cache")
            seq.num_computed_tokens += step
            self._manager.commit_computed(seq)
        ids = tuple(seq.block_table)
        self._manager.free(seq)
        return ids

    def _prompt(self, n: int) -> list[int]:
        total = n * BLOCK_SIZE
        shared = min(self._rng.choice((0, 256, 512)), total - BLOCK_SIZE)
        prefix = self._prefixes[self._rng.randrange(SHARED_PREFIXES)][: max(shared, 0)]
        return prefix + [self._rng.randrange(VOCAB) for _ in range(total - len(prefix))]


class DecodeSide:
    """A decode worker's cache of reservations; :meth:`draw` reserves one more."""

    def __init__(self, num_blocks: int, rng: random.Random, warmup: int = 1000) -> None:
        self._manager = BlockManager(num_blocks, BLOCK_SIZE)
        self._rng = rng
        self._live: list[list[int]] = []
        for _ in range(warmup):
            self.draw(rng.randint(1, 64))

    def draw(self, n: int) -> tuple[int, ...]:
        """The ids of a new ``n``-block reservation; about half the others end first."""
        manager, live, rng = self._manager, self._live, self._rng
        while live and (manager.num_free_blocks < n or rng.random() < 0.5):
            manager.free_blocks(live.pop(rng.randrange(len(live))))
        live.append(manager.allocate_blocks(n))
        return tuple(live[-1])


def scattered_ids(n: int, num_blocks: int, rng: random.Random) -> tuple[int, ...]:
    return tuple(rng.sample(range(num_blocks), n))


def contiguous_ids(n: int, num_blocks: int, rng: random.Random) -> tuple[int, ...]:
    start = rng.randrange(num_blocks - n + 1)
    return tuple(range(start, start + n))


def run_count(ids: tuple[int, ...]) -> int:
    """How many runs of consecutive ids ``ids`` is."""
    return len(long_runs(ids, 1, len(ids)))


def mean_run(draws: list[tuple[int, ...]]) -> float:
    """Mean length, in blocks, of the runs of consecutive ids in ``draws``."""
    return sum(len(ids) for ids in draws) / sum(run_count(ids) for ids in draws)
