"""The prefix index of one pool: which worker holds which KV blocks, in bounded memory.

Fed two ways:

- **events** (:meth:`PrefixIndex.apply`): the workers' ``BlockStored`` / ``BlockEvicted`` /
  ``AllBlocksCleared`` from the pool's Redis stream. These are the truth, a little late.
- **predictions** (:meth:`PrefixIndex.predict`): when the router sends a prompt to a
  prefill worker it assumes the worker will cache the prompt's blocks, so the next request
  with the same prefix (arriving before the events do) goes to the same worker. A
  prediction expires after ``prediction_ttl_s`` unless a ``BlockStored`` confirms it; an
  eviction or clear removes it at once.

Lookups (:meth:`PrefixIndex.match`) return, per worker, how many *leading* blocks of a
prompt's hash chain it holds: the engine reuses a cached prefix only up to its first miss,
so a block held after a gap is worth nothing. Hashes are chained (``common.hashing``), so
equal hashes mean equal prefixes. A lookup walks the prompt's chain once and follows at
most ``max_match_workers`` holders of its first block, so its cost depends on the prompt,
not on the fleet.

Memory: one dict entry per block hash whose value is the holder's *slot* (a small int
standing for a worker id), a tuple of slots, or — for blocks many workers hold, like a
shared system prompt — a frozenset; about 70-90 bytes per (worker, block) entry
(:attr:`approx_bytes`). At most ``max_entries`` entries are kept: past that the least
recently used blocks (dict order: storing or predicting a block moves it to the end) are
evicted with all their holders, a few hundred entries at a time (the router does not
*need* a block's entry; it only routes a little worse without it). Big indexes are split
into up to 64 shards by hash, each its own LRU: a Python dict stalls for a moment when it
resizes, and a shard's resize is 1/64th of the whole index's. A worker that
leaves (clear or gone from the registry) retires its slot at once; its entries are
skipped by lookups and reclaimed as eviction reaches them. The index is owned by one event
loop; not thread-safe.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import islice

from common.kv_events import AllBlocksCleared, BlockEvicted, BlockStored, StreamEvent

_CONFIRMED = math.inf  # expiry of a block an event reported
DEFAULT_MAX_ENTRIES = 4_000_000  # ~300 MB; router config `max_indexed_blocks`
DEFAULT_MAX_MATCH_WORKERS = 32
# Bytes of a 64-bit block hash int object, and per tuple of holders (header + per slot).
_KEY_BYTES = 40
_TUPLE_BYTES = 40
_SLOT_BYTES = 8
_PREDICTION_BYTES = 240  # its (hash, slot) key, expiry, dict entry and queue tuple
_SET_ABOVE = 8  # holders beyond this many live in a frozenset (O(1) membership)
_EVICT_BATCH = 256  # entries evicted at once when the cap is reached
_PURGE_IN_MATCH = 32  # expired predictions a lookup removes (predict() removes the rest)
_MAX_SHARDS = 64
_ENTRIES_PER_SHARD = 65_536  # small indexes keep one shard: exact LRU

Holders = int | tuple[int, ...] | frozenset[int]  # one slot, or several


class PrefixIndex:
    def __init__(
        self,
        prediction_ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_match_workers: int = DEFAULT_MAX_MATCH_WORKERS,
    ) -> None:
        if max_entries < 1 or max_match_workers < 1:
            raise ValueError("max_entries and max_match_workers must be >= 1")
        self._ttl = prediction_ttl_s
        self._clock = clock
        self.max_entries = max_entries
        self._max_match = max_match_workers
        self._slack = max(1, min(max_entries // 64, _EVICT_BATCH))
        # block hash → holder slot(s), in shards by hash; each shard's insertion order is
        # least recently stored first.
        self._n = max(1, min(_MAX_SHARDS, max_entries // _ENTRIES_PER_SHARD))
        self._shards: list[dict[int, Holders]] = [{} for _ in range(self._n)]
        self._slots: dict[str, int] = {}  # live worker id → slot
        self._ids: dict[int, str] = {}  # live slot → worker id
        self._counts: dict[int, int] = {}  # live slot → entries
        self._next_slot = 0
        self._stored = 0  # (block, slot) pairs in the shards, retired slots included
        self._retired = 0  # ... of which belong to retired slots (reclaimed lazily)
        self._tuples = 0  # blocks with more than one holder
        # (hash, slot) → expiry of predictions not confirmed by an event.
        self._predicted: dict[tuple[int, int], float] = {}
        # (expiry, slot, hash) of predictions, oldest first, purged lazily.
        self._queue: deque[tuple[float, int, int]] = deque()
        self.evicted = 0  # entries evicted for the cap, ever (a metric)

    # ---- size ------------------------------------------------------------------------------

    @property
    def num_entries(self) -> int:
        """(worker, block) pairs indexed, predictions included."""
        return self._stored - self._retired

    @property
    def num_blocks(self) -> int:
        """Distinct block hashes held (entries of retired workers not yet reclaimed too)."""
        return sum(len(shard) for shard in self._shards)

    @property
    def approx_bytes(self) -> int:
        """Estimated memory of the index (dict tables, hash ints, holder tuples)."""
        blocks = self.num_blocks
        in_tuples = self._stored - (blocks - self._tuples)
        return (
            sum(sys.getsizeof(shard) for shard in self._shards)
            + blocks * _KEY_BYTES
            + self._tuples * _TUPLE_BYTES
            + in_tuples * _SLOT_BYTES
            + len(self._predicted) * _PREDICTION_BYTES
        )

    # ---- updates ---------------------------------------------------------------------------

    def apply(self, worker_id: str, event: StreamEvent) -> None:
        if isinstance(event, BlockStored):
            self._add(self._slot(worker_id), event.block_hash, _CONFIRMED)
        elif isinstance(event, BlockEvicted):
            slot = self._slots.get(worker_id)
            if slot is not None:
                self._discard(event.block_hash, slot)
        elif isinstance(event, AllBlocksCleared):
            self.drop_worker(worker_id)
        else:
            raise TypeError(f"not a KV stream event: {event!r}")

    def predict(self, worker_id: str, hashes: Sequence[int]) -> None:
        """Assume ``worker_id`` is about to cache these blocks (until events say otherwise)."""
        now = self._clock()
        self._purge(now)
        expiry = now + self._ttl
        slot = self._slot(worker_id)
        add, queue = self._add, self._queue
        if expiry == _CONFIRMED:  # an endless prediction: _add's general path
            for block_hash in hashes:
                add(slot, block_hash, expiry)
            return
        shards, n, predicted = self._shards, self._n, self._predicted
        for block_hash in hashes:
            shard = shards[block_hash % n]
            holders = shard.get(block_hash)
            if holders is not None and (
                holders == slot or (type(holders) is not int and slot in holders)  # type: ignore[operator]
            ):
                # Held already (_add's first branch, inlined: predictions re-mark a whole
                # prompt): now most recently used, and the later expiry wins.
                del shard[block_hash]
                shard[block_hash] = holders
                key = (block_hash, slot)
                if predicted.get(key, _CONFIRMED) >= expiry:
                    continue
                predicted[key] = expiry
                queue.append((expiry, slot, block_hash))
            elif add(slot, block_hash, expiry):
                queue.append((expiry, slot, block_hash))

    def drop_worker(self, worker_id: str) -> None:
        """Forget every block of ``worker_id`` (O(1): its slot retires)."""
        slot = self._slots.pop(worker_id, None)
        if slot is None:
            return
        del self._ids[slot]
        self._retired += self._counts.pop(slot)

    def retain(self, live_workers: Iterable[str]) -> None:
        """Forget workers that are no longer registered (they died without a clear)."""
        live = set(live_workers)
        for worker_id in [w for w in self._slots if w not in live]:
            self.drop_worker(worker_id)

    # ---- lookup ----------------------------------------------------------------------------

    def match(self, hashes: Sequence[int]) -> PrefixMatch:
        """Per worker, the number of leading blocks of ``hashes`` it holds (absent = 0)."""
        # Expired predictions are purged by predict(), after the decision; here only a few,
        # and the walk checks expiry itself while any expired one is left.
        now = self._clock()
        self._purge(now, _PURGE_IN_MATCH)
        stale = bool(self._queue) and self._queue[0][0] < now
        fresh = self._fresh
        ids, shards, n, limit = self._ids, self._shards, self._n, self._max_match
        # Wide part: leading blocks held by more than `limit` workers (a shared system
        # prompt) are not followed worker by worker: everyone holding the last wide block
        # is credited with the wide depth (its holders held the blocks before it: caches
        # keep a prefix's parents at least as long as its children).
        wide: frozenset[int] = frozenset()
        wide_depth = 0
        alive: list[int] = []
        for i, block_hash in enumerate(hashes):
            holders = shards[block_hash % n].get(block_hash)
            if holders is None:
                break
            if type(holders) is frozenset and len(holders) > limit:
                wide, wide_depth = holders, i + 1
                continue
            live = (
                s
                for s in _slots_of(holders)
                if s in ids and (not wide or s in wide) and (not stale or fresh(block_hash, s, now))
            )
            alive = list(islice(live, limit))
            break
        depth = PrefixMatch(self._slots, wide, wide_depth)
        # Narrow part: walk the rest of the chain with the workers still matching; record a
        # worker's depth when it drops out (usually one or two workers hold a given prefix).
        matched = wide_depth + 1
        # ``alive`` is a subset of ``seen``, the last holders looked at: a block with the
        # same holders (a prefix usually has one holder set all along) keeps them all.
        seen = holders if alive else None
        for block_hash in hashes[matched:] if alive else ():
            holders = shards[block_hash % n].get(block_hash)
            if holders == seen and not stale:
                matched += 1
                continue
            seen = holders
            if holders is None:
                still = []
            elif type(holders) is int:
                still = [holders] if holders in alive else []
            else:
                still = [s for s in alive if s in holders]  # type: ignore[operator]
            if stale:
                still = [s for s in still if fresh(block_hash, s, now)]
            if len(still) != len(alive):
                for slot in alive:
                    if slot not in still:
                        depth[ids[slot]] = matched
                alive = still
            if not alive:
                break
            matched += 1
        for slot in alive:
            depth[ids[slot]] = matched
        return depth

    # ---- internals -------------------------------------------------------------------------

    def _slot(self, worker_id: str) -> int:
        slot = self._slots.get(worker_id)
        if slot is None:
            slot = self._slots[worker_id] = self._next_slot
            self._ids[slot] = worker_id
            self._counts[slot] = 0
            self._next_slot += 1
        return slot

    def _add(self, slot: int, block_hash: int, expiry: float) -> bool:
        """Record a holder and mark the block used; True if ``expiry`` is a new prediction."""
        shard = self._shards[block_hash % self._n]
        holders = shard.pop(block_hash, None)  # re-inserted below: now most recent
        key = (block_hash, slot)
        if holders is not None and (holders == slot or slot in _slots_of(holders)):
            shard[block_hash] = holders
            current = self._predicted.get(key, _CONFIRMED)
            if current >= expiry:
                return False  # confirmed already, or a later prediction
        else:
            shard[block_hash] = self._joined(holders, slot)
            self._stored += 1
            self._counts[slot] += 1
            if self._stored > self.max_entries:
                self._evict(block_hash % self._n, self.max_entries - self._slack)
                if block_hash not in shard:  # only with a cap below the slack
                    return False
        if expiry == _CONFIRMED:
            self._predicted.pop(key, None)
            return False
        self._predicted[key] = expiry
        return True

    def _joined(self, holders: Holders | None, slot: int) -> Holders:
        """``holders`` plus ``slot``, dropping retired slots on the way."""
        if holders is None:
            return slot
        if not self._retired:  # no retired slot holds anything: every holder is kept
            slots = _slots_of(holders)
            if len(slots) == 1:
                self._tuples += 1  # one holder becomes several
            return _many((*slots, slot))
        kept = tuple(s for s in _slots_of(holders) if s in self._ids)
        self._retired -= len(_slots_of(holders)) - len(kept)
        self._stored -= len(_slots_of(holders)) - len(kept)
        if len(_slots_of(holders)) > 1:
            self._tuples -= 1
        if not kept:
            return slot
        self._tuples += 1
        return _many((*kept, slot))

    def _discard(self, block_hash: int, slot: int) -> None:
        """Remove one holder of one block (its LRU position is kept)."""
        shard = self._shards[block_hash % self._n]
        holders = shard.get(block_hash)
        if holders is None:
            return
        slots = _slots_of(holders)
        if slot not in slots:
            return
        rest = tuple(s for s in slots if s != slot)
        if len(slots) > 1:
            self._tuples -= 1
        if not rest:
            del shard[block_hash]
        elif len(rest) == 1:
            shard[block_hash] = rest[0]
        else:
            shard[block_hash] = _many(rest)
            self._tuples += 1
        self._forget(block_hash, slot)

    def _forget(self, block_hash: int, slot: int) -> None:
        """Accounting for one (block, slot) pair leaving the index."""
        self._stored -= 1
        if slot in self._ids:
            self._counts[slot] -= 1
        else:
            self._retired -= 1
        self._predicted.pop((block_hash, slot), None)

    def _evict(self, first: int, target: int) -> None:
        """Drop least recently used blocks until at most ``target`` entries remain, from
        shard ``first`` (the one just stored into, which keeps shards even), then others."""
        for i in range(self._n):
            shard = self._shards[(first + i) % self._n]
            while self._stored > target and shard:
                for block_hash in list(islice(shard, max(64, self._stored - target))):
                    holders = shard.pop(block_hash)
                    slots = _slots_of(holders)
                    if len(slots) > 1:
                        self._tuples -= 1
                    for slot in slots:
                        self._forget(block_hash, slot)
                        self.evicted += 1
                    if self._stored <= target:
                        break
            if self._stored <= target:
                return

    def _fresh(self, block_hash: int, slot: int, now: float) -> bool:
        """Whether (block, slot) is confirmed or an unexpired prediction."""
        return self._predicted.get((block_hash, slot), _CONFIRMED) >= now

    def _purge(self, now: float, limit: int | None = None) -> None:
        """Remove predictions that expired before ``now`` (at most ``limit``)."""
        left = -1 if limit is None else limit
        while self._queue and self._queue[0][0] < now and left != 0:
            left -= 1
            expiry, slot, block_hash = self._queue.popleft()
            # Only if the entry is still this prediction (not confirmed, not re-predicted).
            key = (block_hash, slot)
            if self._predicted.get(key) == expiry:
                del self._predicted[key]
                self._discard(block_hash, slot)


def _slots_of(holders: Holders) -> tuple[int, ...] | frozenset[int]:
    return (holders,) if type(holders) is int else holders  # type: ignore[return-value]


def _many(slots: tuple[int, ...]) -> Holders:
    return frozenset(slots) if len(slots) > _SET_ABOVE else slots


class PrefixMatch(dict[str, int]):
    """Worker id → leading blocks held: the workers followed one by one as dict items, plus
    (through :meth:`get` and ``[]``) every holder of a wide shared prefix at its depth."""

    __slots__ = ("_slots", "_wide", "_wide_depth")

    def __init__(self, slots: dict[str, int], wide: frozenset[int], wide_depth: int) -> None:
        super().__init__()
        self._slots = slots
        self._wide = wide
        self._wide_depth = wide_depth

    def get(self, worker_id: str, default: int | None = None) -> int | None:  # type: ignore[override]
        held = dict.get(self, worker_id)
        if held is not None:
            return held
        if self._wide and self._slots.get(worker_id, -1) in self._wide:
            return self._wide_depth
        return default

    def __missing__(self, worker_id: str) -> int:
        held = self.get(worker_id)
        if held is None:
            raise KeyError(worker_id)
        return held
