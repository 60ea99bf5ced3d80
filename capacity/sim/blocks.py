"""A replica's KV block pool with an LRU prefix cache, by block hash (no block ids).

The rules are engine/block_manager.py's, checked against it op for op in
tests/unit/test_sim_blocks.py:

- a prompt reuses its cached *leading* full blocks, leaving at least one token to
  compute: at most ``(prompt_tokens - 1) // block_size`` blocks;
- a reused block is referenced again (taken off the evictable list if nobody held it);
- fresh blocks come from the free blocks first, then by evicting the least recently
  released cached block (``BlockEvicted``);
- once computed, a sequence's full blocks are cached under their hashes (``BlockStored``
  for a hash not cached yet; a duplicate stays an uncached block, the rest still cache);
- freeing releases a sequence's blocks tail first, so among equally old blocks the tail
  is evicted before the head (the shared part).

Not modelled: the real allocator's preference for contiguous runs on long allocations
(``RUN_EVICTION_MIN_BLOCKS``), which can evict a cached block while free ones remain.
KV events go to ``listener(stored: bool, block_hash)`` when one is set.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class Holding:
    """The blocks one sequence holds: cached ones by hash, in order, plus uncached ones."""

    cached: list[int] = field(default_factory=list)
    uncached: int = 0
    done: int = 0  # leading hashes of the sequence already reused or committed

    @property
    def num_blocks(self) -> int:
        return len(self.cached) + self.uncached


class BlockPool:
    """``num_blocks`` KV blocks; see the module doc for the rules."""

    __slots__ = ("_evictable", "_refs", "block_size", "caching", "free", "listener", "num_blocks")

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self.free = num_blocks  # neither referenced nor cached
        self._refs: dict[int, int] = {}  # cached hash -> references
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced, LRU
        # (stored, block hash) per cache change: the replica's KV events, when set
        self.listener: Callable[[bool, int], None] | None = None

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now (free + evictable), as the engine counts."""
        return self.free + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._refs)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def match(self, hashes: Sequence[int], prompt_tokens: int) -> int:
        """Leading blocks of ``hashes`` cached here (at most (prompt - 1) // block_size)."""
        if not self.caching:
            return 0
        refs = self._refs
        limit = min(len(hashes), (prompt_tokens - 1) // self.block_size)
        n = 0
        while n < limit and hashes[n] in refs:
            n += 1
        return n

    def can_allocate(self, hashes: Sequence[int], prompt_tokens: int, total_blocks: int) -> bool:
        """Whether :meth:`allocate` would succeed now."""
        matched = self.match(hashes, prompt_tokens)
        reused_evictable = sum(1 for h in hashes[:matched] if self._refs[h] == 0)
        return total_blocks - matched <= self.num_free_blocks - reused_evictable

    def allocate(self, hashes: Sequence[int], prompt_tokens: int, total_blocks: int) -> Holding:
        """Reuse the cached prefix of ``hashes`` and take fresh blocks up to
        ``total_blocks``. Call :meth:`can_allocate` first."""
        return self._take_prefix(hashes, self.match(hashes, prompt_tokens), total_blocks)

    def try_allocate(
        self, hashes: Sequence[int], prompt_tokens: int, total_blocks: int
    ) -> Holding | None:
        """:meth:`allocate` if :meth:`can_allocate`, else None (one prefix match for both)."""
        matched = self.match(hashes, prompt_tokens)
        refs = self._refs
        reused_evictable = sum(1 for h in hashes[:matched] if refs[h] == 0) if matched else 0
        if total_blocks - matched > self.free + len(self._evictable) - reused_evictable:
            return None
        return self._take_prefix(hashes, matched, total_blocks)

    def _take_prefix(self, hashes: Sequence[int], matched: int, total_blocks: int) -> Holding:
        """Reference the ``matched`` leading cached blocks, take the rest fresh."""
        refs, evictable = self._refs, self._evictable
        for h in hashes[:matched]:
            if refs[h] == 0:
                del evictable[h]
            refs[h] += 1
        fresh = total_blocks - matched
        self._take(fresh)
        return Holding(list(hashes[:matched]), fresh, matched)

    def reserve(self, n: int) -> Holding:
        """``n`` fresh uncached blocks (the decode side of a KV transfer)."""
        self._take(n)
        return Holding([], n)

    def commit(self, holding: Holding, hashes: Sequence[int]) -> None:
        """Cache the holding's blocks under ``hashes`` (its first full blocks, computed)."""
        if not self.caching:
            return
        refs = self._refs
        for h in hashes[holding.done :]:
            if holding.uncached <= 0:
                break
            holding.done += 1
            if h in refs:
                continue  # a duplicate (computed twice at once) stays an uncached block
            refs[h] = 1
            holding.uncached -= 1
            holding.cached.append(h)
            if self.listener is not None:
                self.listener(True, h)

    def release(self, holding: Holding) -> None:
        """Drop the holding's references, tail first (see the module doc)."""
        refs, evictable = self._refs, self._evictable
        self.free += holding.uncached
        for h in reversed(holding.cached):
            left = refs[h] - 1
            refs[h] = left
            if left == 0:
                evictable[h] = None
        holding.cached = []
        holding.uncached = holding.done = 0

    def _take(self, n: int) -> None:
        if n <= self.free:
            self.free -= n
            return
        need = n - self.free
        if need > len(self._evictable):
            raise RuntimeError(f"need {n} blocks, only {self.num_free_blocks} free")
        self.free = 0
        refs, evictable = self._refs, self._evictable
        for _ in range(need):
            h, _ = evictable.popitem(last=False)
            del refs[h]
            if self.listener is not None:
                self.listener(False, h)
