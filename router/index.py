"""The prefix index of one pool: which worker holds which KV blocks.

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
equal hashes mean equal prefixes. The index is owned by one event loop; not thread-safe.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from common.kv_events import AllBlocksCleared, BlockEvicted, BlockStored, StreamEvent

_CONFIRMED = math.inf  # expiry of a block an event reported


class PrefixIndex:
    def __init__(
        self, prediction_ttl_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = prediction_ttl_s
        self._clock = clock
        # block hash → {worker id → expiry}; math.inf when confirmed by an event.
        self._holders: dict[int, dict[str, float]] = {}
        self._by_worker: dict[str, set[int]] = {}
        # (expiry, worker, hash) of predictions, oldest first, purged lazily.
        self._predictions: deque[tuple[float, str, int]] = deque()

    @property
    def num_entries(self) -> int:
        """(worker, block) pairs indexed, predictions included."""
        return sum(len(blocks) for blocks in self._by_worker.values())

    # ---- updates ---------------------------------------------------------------------------

    def apply(self, worker_id: str, event: StreamEvent) -> None:
        if isinstance(event, BlockStored):
            self._add(worker_id, event.block_hash, _CONFIRMED)
        elif isinstance(event, BlockEvicted):
            self._remove(worker_id, event.block_hash)
        elif isinstance(event, AllBlocksCleared):
            self.drop_worker(worker_id)
        else:
            raise TypeError(f"not a KV stream event: {event!r}")

    def predict(self, worker_id: str, hashes: Sequence[int]) -> None:
        """Assume ``worker_id`` is about to cache these blocks (until events say otherwise)."""
        expiry = self._clock() + self._ttl
        for block_hash in hashes:
            if self._add(worker_id, block_hash, expiry):
                self._predictions.append((expiry, worker_id, block_hash))

    def drop_worker(self, worker_id: str) -> None:
        for block_hash in self._by_worker.pop(worker_id, ()):
            holders = self._holders.get(block_hash)
            if holders is not None:
                holders.pop(worker_id, None)
                if not holders:
                    del self._holders[block_hash]

    def retain(self, live_workers: Iterable[str]) -> None:
        """Forget workers that are no longer registered (they died without a clear)."""
        live = set(live_workers)
        for worker_id in [w for w in self._by_worker if w not in live]:
            self.drop_worker(worker_id)

    # ---- lookup ----------------------------------------------------------------------------

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per worker, the number of leading blocks of ``hashes`` it holds (absent = 0)."""
        now = self._clock()
        self._purge(now)
        first = self._holders.get(hashes[0]) if hashes else None
        if not first:
            return {}
        # Walk the chain with the workers still matching; record a worker's depth when it
        # drops out (usually one or two workers hold a given prefix).
        alive = [w for w, expiry in first.items() if expiry >= now]
        depth: dict[str, int] = {}
        matched = 1
        for block_hash in hashes[1:]:
            if not alive:
                break
            holders = self._holders.get(block_hash)
            still = [w for w in alive if holders.get(w, -1.0) >= now] if holders else []
            if len(still) != len(alive):
                for worker_id in alive:
                    if worker_id not in still:
                        depth[worker_id] = matched
                alive = still
            if alive:
                matched += 1
        for worker_id in alive:
            depth[worker_id] = matched
        return depth

    # ---- internals -------------------------------------------------------------------------

    def _add(self, worker_id: str, block_hash: int, expiry: float) -> bool:
        """Record a holder; True if ``expiry`` is now this entry's (a new prediction)."""
        holders = self._holders.setdefault(block_hash, {})
        current = holders.get(worker_id)
        if current is not None and current >= expiry:
            return False  # confirmed already, or a later prediction
        holders[worker_id] = expiry
        self._by_worker.setdefault(worker_id, set()).add(block_hash)
        return True

    def _remove(self, worker_id: str, block_hash: int) -> None:
        holders = self._holders.get(block_hash)
        if holders is None or holders.pop(worker_id, None) is None:
            return
        if not holders:
            del self._holders[block_hash]
        blocks = self._by_worker.get(worker_id)
        if blocks is not None:
            blocks.discard(block_hash)

    def _purge(self, now: float) -> None:
        while self._predictions and self._predictions[0][0] < now:
            expiry, worker_id, block_hash = self._predictions.popleft()
            holders = self._holders.get(block_hash)
            # Only if the entry is still this prediction (not confirmed, not re-predicted).
            if holders is not None and holders.get(worker_id) == expiry:
                self._remove(worker_id, block_hash)
