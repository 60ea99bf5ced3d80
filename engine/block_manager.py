"""Paged KV block allocator with a prefix cache. Device-free: it hands out block *ids*;
``engine.kv_cache`` owns the tensor they index.

Every block is in exactly one state:
  free       refcount 0, holds nothing reusable; handed out first, as few runs of
             consecutive ids as the free space allows (``engine.free_blocks``).
  used       refcount > 0, referenced by sequences or raw reservations. A used block may
             also be *cached* (a full block registered by ``commit_computed``).
  evictable  refcount 0 but still cached; reused on a prefix hit, or reclaimed in LRU order
             (oldest release first, emitting ``BlockEvicted``) into the free blocks when
             there are not enough of them — or, for a long allocation, to free a run
             (``RUN_EVICTION_MIN_BLOCKS``).

A sequence's life as seen from here:
  allocate_prefix  (admission: borrow the cached blocks of its prefix)
  → append_slots   (every step, before the model runs: room for the scheduled tokens)
  → commit_computed (every step, after the model ran: cache newly full blocks, BlockStored)
  → free           (finish, abort or preemption; tail blocks become evictable first).

The raw API (``allocate_blocks`` / ``free_blocks``) serves the decode side of a KV
transfer, which reserves blocks that another process fills. A reservation is not cached;
once the KV has landed and the blocks join a sequence (``Scheduler.add_prefilled``) their
full blocks are committed like any computed ones, so the decode side's prefix cache holds
them too.
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from collections.abc import Iterable

from common.hashing import ROOT_HASH, hash_block
from common.kv_events import BlockEvicted, BlockStored, KVEvent
from engine.free_blocks import FreeBlocks
from engine.sequence import Sequence

# Allocations this long (16-token blocks: 128 tokens) may evict cached blocks early to come
# out as one run; shorter ones (decode growth, short prompts) take free holes first, as
# strict LRU. ``python -m benchmarks.allocator`` measures the trade: runs against prefix
# hits, with and without it.
RUN_EVICTION_MIN_BLOCKS = 8
WINDOW_AGE_FACTOR = 4  # see BlockManager._evict_for_run


class NoFreeBlocksError(RuntimeError):
    """More blocks were requested than are free or evictable."""


class DoubleFreeError(RuntimeError):
    """A block was released more times than it was referenced."""


def _require(condition: bool, message: str) -> None:
    # Explicit raise rather than `assert`, so invariant checks survive `python -O`.
    if not condition:
        raise AssertionError(message)


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        run_eviction_min_blocks: int = RUN_EVICTION_MIN_BLOCKS,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.run_eviction_min_blocks = run_eviction_min_blocks
        self._refcount = [0] * num_blocks
        self._free = FreeBlocks(num_blocks)
        # cached, unreferenced block -> release tick (increasing: LRU first)
        self._evictable: OrderedDict[int, int] = OrderedDict()
        self._tick = 0
        self._hash_to_block: dict[int, int] = {}
        self._block_to_hash: dict[int, int] = {}
        # request_id -> (number of leading blocks already hashed, hash of the last of them),
        # so commit_computed hashes each block once. Dropped by free().
        self._committed: dict[str, tuple[int, int]] = {}
        self._events: list[KVEvent] = []

    # ---- accounting -------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: never-used/uncached plus evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_to_block)

    def ref_count(self, block_id: int) -> int:
        return self._refcount[block_id]

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def take_events(self) -> list[KVEvent]:
        """Drain the KV events emitted since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    # ---- sequence API -----------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> int:
        """Tokens of ``seq`` whose KV the prefix cache already holds (full blocks only)."""
        return len(self._matched_blocks(seq)) * self.block_size

    def allocate_prefix(self, seq: Sequence) -> None:
        """Borrow the cached prefix blocks of a sequence that holds no blocks yet."""
        if seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"{seq.request_id}: allocate_prefix needs a seq with no blocks")
        matched = self._matched_blocks(seq)
        for _, block in matched:
            self._acquire_cached(block)
        seq.block_table.extend(block for _, block in matched)
        seq.num_computed_tokens = seq.num_cached_tokens = len(matched) * self.block_size
        if matched:
            self._committed[seq.request_id] = (len(matched), matched[-1][0])

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so positions [0, num_computed + num_new_tokens) have a slot."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow ``seq.block_table`` for ``num_new_tokens`` more tokens; all or nothing."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            return False
        after = seq.block_table[-1] + 1 if seq.block_table else None
        # A chunk of a longer prompt: place it where the rest of the prompt fits after it.
        expect = self.blocks_needed(seq, seq.num_tokens - seq.num_computed_tokens)
        seq.block_table.extend(self._take_fresh(needed, after, max(needed, expect)))
        return True

    def commit_computed(self, seq: Sequence) -> None:
        """Cache every block of ``seq`` that became full of computed KV since the last call."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        done, parent = self._committed.get(seq.request_id, (0, ROOT_HASH))
        if num_full <= done:
            return
        tokens = seq.all_token_ids
        size = self.block_size
        for i in range(done, num_full):
            block_hash = hash_block(parent, tokens[i * size : (i + 1) * size])
            self._cache_block(seq.block_table[i], block_hash, parent)
            parent = block_hash
        self._committed[seq.request_id] = (num_full, parent)

    def trim(self, seq: Sequence) -> None:
        """Free the tail blocks of ``seq`` beyond its computed tokens (speculative decoding
        rolls back the slots of rejected drafts). Those blocks were never committed, so
        they go straight back to the free list."""
        keep = -(-seq.num_computed_tokens // self.block_size)
        if len(seq.block_table) <= keep:
            return
        extra = seq.block_table[keep:]
        self._check_releasable(extra)
        for block in reversed(extra):
            self._release(block)
        del seq.block_table[keep:]

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq`` (a no-op for an empty table) and clear the table.

        Released in reverse so that, among equally old cached blocks, a sequence's tail is
        evicted before its head: the head is the part other prompts are likely to share.
        """
        self._check_releasable(seq.block_table)
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table.clear()
        self._committed.pop(seq.request_id, None)

    # ---- raw API (KV transfer receivers) ----------------------------------------------

    def allocate_blocks(self, n: int) -> list[int]:
        """Reserve ``n`` fresh blocks with refcount 1; evicts cached blocks if it must."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > self.num_free_blocks:
            raise NoFreeBlocksError(
                f"need {n} blocks, only {self.num_free_blocks} of {self.num_blocks} free"
            )
        return self._take_fresh(n)

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block; validated first, so a bad call changes nothing."""
        block_ids = list(block_ids)
        self._check_releasable(block_ids)
        for block in block_ids:
            self._release(block)

    # ---- internals --------------------------------------------------------------------

    def _matched_blocks(self, seq: Sequence) -> list[tuple[int, int]]:
        """(hash, block id) of the cached leading full blocks, leaving >= 1 token to compute."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs:
            return []  # prompt_logprobs need every prompt position computed
        tokens = seq.all_token_ids
        size = self.block_size
        matched: list[tuple[int, int]] = []
        parent = ROOT_HASH
        for i in range((len(tokens) - 1) // size):
            parent = hash_block(parent, tokens[i * size : (i + 1) * size])
            block = self._hash_to_block.get(parent)
            if block is None:
                break
            matched.append((parent, block))
        return matched

    def _acquire_cached(self, block: int) -> None:
        if self._refcount[block] == 0:
            del self._evictable[block]  # in use again: no longer a reclaim candidate
        self._refcount[block] += 1

    def _take_fresh(self, n: int, after: int | None = None, expect: int = 0) -> list[int]:
        """``n`` blocks with no content anyone can hit, continuing the run that ends just
        before ``after`` if it can, placed where ``expect`` blocks in all would fit (see
        ``FreeBlocks.take``); callers have checked availability.

        Cached blocks are evicted, least recently released first, as many as the free ones
        fall short. But a full cache is mostly cached blocks with single free blocks between
        them (a sequence's partial last block, duplicates): taking those holes would cut
        every allocation into pieces, and each piece costs the KV transfer a message or a
        copy. So an allocation of at least ``run_eviction_min_blocks`` that no free run can
        hold first evicts a window of cached blocks around the oldest one
        (:meth:`_evict_for_run`); a hole heals once its neighbours go.
        """
        want = max(n, expect)
        if (
            want >= self.run_eviction_min_blocks
            and self._free.longest() < want
            and self._free.extent_at(after) < n
        ):
            self._evict_for_run(want)
        for _ in range(n - len(self._free)):
            self._evict(next(iter(self._evictable)))
        blocks = self._free.take(n, after, expect)
        for block in blocks:
            self._refcount[block] = 1
        return blocks

    def _evict_for_run(self, n: int) -> None:
        """Evict until some free run holds ``n`` blocks, or ``n`` blocks are gone.

        Each round takes the oldest cached block. If it lies within ``n`` consecutive ids
        that are all free or *old* cached blocks (among the ``WINDOW_AGE_FACTOR * n``
        least recently released when the call began), the cached ones of that window go;
        else just it. Young
        cached blocks — a shared system prompt that keeps being hit — are never evicted
        out of turn."""
        # The age bar is set once per call: evicting the oldest blocks only lowers it.
        ages = self._evictable.values()
        limit = next(itertools.islice(ages, WINDOW_AGE_FACTOR * n - 1, None), self._tick)

        def spare(block: int) -> bool:  # free, or cached and old enough
            return self._refcount[block] == 0 and self._evictable.get(block, -1) <= limit

        budget = n
        while self._evictable and budget > 0 and self._free.longest() < n:
            oldest = next(iter(self._evictable))
            lo = hi = oldest
            while lo > 0 and spare(lo - 1) and oldest - lo + 1 < n:
                lo -= 1
            while hi + 1 < self.num_blocks and spare(hi + 1) and hi - lo + 1 < n:
                hi += 1
            window = range(lo, hi + 1) if hi - lo + 1 >= n else range(oldest, oldest + 1)
            for block in window:
                if block in self._evictable:
                    self._evict(block)
                    budget -= 1

    def _evict(self, block: int) -> None:
        del self._evictable[block]
        block_hash = self._block_to_hash.pop(block)
        del self._hash_to_block[block_hash]
        self._events.append(BlockEvicted(block_hash=block_hash, block_id=block))
        self._free.put(block)

    def _cache_block(self, block: int, block_hash: int, parent_hash: int) -> None:
        # An identical block cached earlier (another seq computed the same prefix) keeps
        # the mapping; this seq's duplicate simply goes back to the free list when released.
        if block_hash in self._hash_to_block or block in self._block_to_hash:
            return
        self._hash_to_block[block_hash] = block
        self._block_to_hash[block] = block_hash
        self._events.append(BlockStored(block_hash, parent_hash, block))

    def _check_releasable(self, block_ids: list[int]) -> None:
        for block, count in Counter(block_ids).items():
            if not 0 <= block < self.num_blocks:
                raise ValueError(f"block id {block} out of range [0, {self.num_blocks})")
            if self._refcount[block] < count:
                raise DoubleFreeError(
                    f"block {block} released {count}x with refcount {self._refcount[block]}"
                )

    def _release(self, block: int) -> None:
        self._refcount[block] -= 1
        if self._refcount[block] == 0:
            if block in self._block_to_hash:
                self._evictable[block] = self._tick  # most recently used end
                self._tick += 1
            else:
                self._free.put(block)

    # ---- testing aid ------------------------------------------------------------------

    def check_invariants(self, live: Iterable[Sequence] | None = None) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent.

        With ``live`` (every sequence holding blocks, and no raw reservations outstanding),
        also check that each refcount equals the number of block tables naming the block.
        """
        self._free.check()
        free, evictable = set(self._free.ids()), set(self._evictable)
        _require(len(free) == len(self._free), "duplicate block on the free list")
        _require(not free & evictable, f"blocks both free and evictable: {free & evictable}")
        for block, ref in enumerate(self._refcount):
            cached = block in self._block_to_hash
            if block in free:
                _require(ref == 0 and not cached, f"free block {block}: ref={ref} cached={cached}")
            elif block in evictable:
                _require(ref == 0 and cached, f"evictable block {block}: ref={ref} cached={cached}")
            else:
                _require(ref > 0, f"block {block} leaked: refcount {ref} and on no free list")
        _require(len(self._hash_to_block) == len(self._block_to_hash), "cache maps differ in size")
        for block_hash, block in self._hash_to_block.items():
            _require(
                self._block_to_hash.get(block) == block_hash, f"cache maps disagree on {block}"
            )
        if live is not None:
            live = list(live)
            expected = Counter(block for seq in live for block in seq.block_table)
            for block, ref in enumerate(self._refcount):
                _require(ref == expected[block], f"block {block}: ref {ref} != {expected[block]}")
            stale = set(self._committed) - {seq.request_id for seq in live}
            _require(not stale, f"commit state leaked for {sorted(stale)}")
