"""The router, simulated by running its own code: admission, snapshot, decision, index.

Imported, not re-written:

- :func:`router.routing.decide` over a :class:`~router.snapshot.PoolSnapshot` built from
  the simulated replicas' load (rebuilt every ``refresh_interval_s`` of simulated time,
  as the real registry view is; big pools get the real :func:`router.candidates.load_order`
  shortlists), the pool's policy from :func:`router.policies.make_policy` and the pool's
  conditional-disaggregation thresholds;
- :class:`router.index.PrefixIndex` on the simulated clock, fed with each replica's
  simulated KV events (``BlockStored`` / ``BlockEvicted``) and the router's own predictions;
- :class:`common.admission.AdmissionQueue` for the pool's ``max_in_flight`` /
  ``max_queued`` limits (refusals are recorded as the load generator records them).

The router's per-worker bookkeeping (:class:`~router.snapshot.Pending`: streams open,
prompt tokens sent and not yet first-tokened, requests routed) is kept here as counters
and handed to the policy through a read-only mapping.
"""

from __future__ import annotations

from collections.abc import Callable

from capacity.sim.replica import EngineReplica
from common.kv_events import BlockEvicted, BlockStored
from common.worker_info import BlockGeometry, WorkerInfo, WorkerLoad, WorkerRole
from router.candidates import NARROW_ABOVE, load_order
from router.config import Policy, PoolConfig
from router.index import PrefixIndex
from router.policies import RouteQuery, make_policy
from router.routing import Decision, decide
from router.snapshot import Pending, PoolSnapshot, WorkerView

_MODEL = "simulated"


class PendingCounters(dict[str, Pending]):
    """worker id → :class:`Pending`, replaced on every change (policies read it a lot)."""

    def add(self, worker_id: str, requests: int = 0, prefill_tokens: int = 0,
            routed: int = 0) -> None:  # fmt: skip
        old = self.get(worker_id) or Pending()
        self[worker_id] = Pending(
            old.requests + requests, old.prefill_tokens + prefill_tokens, old.routed + routed
        )


class SimRouter:
    """One pool's routing decisions over the live simulated replicas."""

    def __init__(
        self,
        pool: PoolConfig,
        clock: Callable[[], float],
        *,
        refresh_interval_s: float,
        prediction_ttl_s: float,
        seed: int,
        index_events: bool | None = None,
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.refresh_interval_s = refresh_interval_s
        self.policy = make_policy(pool, seed)
        use_index = pool.policy is Policy.PREFIX_AWARE or (
            pool.conditional is not None and pool.conditional.enabled
        )
        self.use_index = use_index if index_events is None else index_events
        self.index = PrefixIndex(prediction_ttl_s, clock=clock) if self.use_index else None
        self._conditional = pool.conditional is not None and pool.conditional.enabled
        self.pending = PendingCounters()
        self.replicas: dict[str, EngineReplica] = {}
        self._infos: dict[str, WorkerInfo] = {}
        self._draining: tuple[str, ...] | None = None  # ids of draining replicas
        self._dirty: set[str] = set()  # replicas whose load changed since the refresh
        # live, non-draining views by role, each dict in worker-id order; None: rebuild
        self._groups: dict[WorkerRole, dict[str, WorkerView]] | None = None
        self._snapshot: PoolSnapshot | None = None
        self._taken_at = -1.0
        self._epoch = 0
        self.decisions = 0

    # ---- membership ----------------------------------------------------------------------

    def add(self, replica: EngineReplica) -> None:
        geometry = BlockGeometry(
            model=_MODEL,
            dtype="float32",
            block_size=replica.blocks.block_size,
            num_layers=1,
            num_kv_heads=1,
            head_dim=1,
            num_blocks=replica.blocks.num_blocks,
        )
        kv = None if replica.role is WorkerRole.COLOCATED else f"sim:{replica.worker_id}"
        self._infos[replica.worker_id] = WorkerInfo(
            replica.worker_id, replica.role, self.pool.name, _MODEL, "sim", kv, geometry, 0.0
        )
        self.replicas[replica.worker_id] = replica
        replica.dirty = self._dirty
        self._groups = None
        self.pending.setdefault(replica.worker_id, Pending())
        # Decode workers' KV events matter only to conditional disaggregation (the
        # decode_cached input); prefill and colocated workers' feed the prefix policy.
        feeds = replica.role is not WorkerRole.DECODE or self._conditional
        if self.index is not None and feeds:
            index, worker_id = self.index, replica.worker_id

            def listener(stored: bool, block_hash: int) -> None:
                event = BlockStored(block_hash, 0, 0) if stored else BlockEvicted(block_hash, 0)
                index.apply(worker_id, event)

            replica.blocks.listener = listener
        self.changed()

    def remove(self, worker_id: str) -> None:
        """The replica is gone (scaled down and drained)."""
        self.replicas.pop(worker_id, None)
        self._infos.pop(worker_id, None)
        self._groups = None
        if self.index is not None:
            self.index.drop_worker(worker_id)
        self.changed()

    def changed(self) -> None:
        """Membership or draining changed: the next decision refreshes."""
        self._snapshot = None
        self._groups = None
        self._draining = None

    # ---- decisions -----------------------------------------------------------------------

    def decide(
        self, hashes: tuple[int, ...], prompt: int, output: int, refused: frozenset[str]
    ) -> Decision:
        """The real decision for one attempt (RequestError when the pool cannot take it)."""
        snapshot = self._fresh_snapshot()
        matched = self.index.match(hashes) if self.index is not None else {}
        query = RouteQuery(prompt, output, self._block_size(), matched)
        decision = decide(
            snapshot,
            self.policy,
            query,
            self.pending,
            refused=refused,
            conditional=self.pool.conditional,
        )
        self.decisions += 1
        return decision

    def routed(self, decision: Decision, hashes: tuple[int, ...], prompt: int) -> None:
        """Record a decision the way the real router does (pending, prediction)."""
        pending = self.pending
        decode_id = decision.decode.worker_id
        if decision.prefill is None:
            pending.add(decode_id, requests=1, routed=1, prefill_tokens=prompt)
            caching = decode_id
        else:
            caching = decision.prefill.worker_id
            pending.add(decode_id, requests=1, routed=1)
            pending.add(caching, requests=1, routed=1, prefill_tokens=prompt)
        if self.index is not None and hashes:
            self.index.predict(caching, hashes)

    def first_token(self, caching_id: str, prompt: int) -> None:
        self.pending.add(caching_id, prefill_tokens=-prompt)

    def closed(self, worker_ids: tuple[str, ...]) -> None:
        for worker_id in worker_ids:
            self.pending.add(worker_id, requests=-1)

    def _block_size(self) -> int:
        for replica in self.replicas.values():
            return replica.blocks.block_size
        return 16

    def _fresh_snapshot(self) -> PoolSnapshot:
        now = self.clock()
        if self._snapshot is not None and now - self._taken_at < self.refresh_interval_s:
            return self._snapshot
        groups = self._groups
        if groups is None:
            groups = self._groups = {r: {} for r in WorkerRole}
            for worker_id in sorted(self.replicas):
                replica = self.replicas[worker_id]
                if not replica.draining:
                    groups[replica.role][worker_id] = WorkerView(
                        self._infos[worker_id], _load(replica, now)
                    )
            self._dirty.clear()
        for worker_id in self._dirty:
            replica = self.replicas.get(worker_id)
            if replica is not None and not replica.draining:
                groups[replica.role][worker_id] = WorkerView(
                    self._infos[worker_id], _load(replica, now)
                )
        self._dirty.clear()
        if self._draining is None:
            self._draining = tuple(sorted(w for w, r in self.replicas.items() if r.draining))
        prefill = tuple(groups[WorkerRole.PREFILL].values())
        decode = tuple(groups[WorkerRole.DECODE].values())
        colocated = tuple(groups[WorkerRole.COLOCATED].values())
        self._epoch += 1
        big = max(len(prefill), len(decode), len(colocated)) > NARROW_ABOVE
        self._snapshot = PoolSnapshot(
            self.pool.name,
            prefill,
            decode,
            colocated,
            now,
            self._draining,
            load_order(prefill, decode, colocated, self._epoch) if big else None,
        )
        self._taken_at = now
        return self._snapshot


def _load(replica: EngineReplica, now: float) -> WorkerLoad:
    """What the replica's heartbeat would report now."""
    pool = replica.blocks
    batch = replica.batch
    return WorkerLoad(
        worker_id=replica.worker_id,
        queued=max(replica.assigned - batch, 0),
        running=batch,
        free_blocks=pool.num_free_blocks,
        used_blocks=pool.num_used_blocks,
        cached_blocks=pool.num_free_blocks - pool.free,
        queued_prefill_tokens=max(replica.queued_prefill_tokens, 0),
        updated_at=now,
    )
