"""The simulated cluster: replicas, the router, and each request's way through them.

:class:`Cluster` owns the wiring and the request lifecycle of :mod:`capacity.sim.job`;
the replicas (:mod:`capacity.sim.replica`) own their queues and steps, the router adapter
(:mod:`capacity.sim.router`) the decisions, the autoscaler (:mod:`capacity.sim.autoscale`)
the replica counts. Overheads from the profile: ``router_decision_s`` before each decision,
``overheads["rpc_s"]`` (if present) for each hop router → decode → prefill, a remote
prefill's measured hand-off (``cost.handoff_s``) on top of its transfer, and, when its
decode replica is mid-step as the KV lands, ``cost.busy_decode_handoff_s()`` more before
the first token goes out (the sequence still joins the batch at the next step boundary).
"""

from __future__ import annotations

import itertools
from collections import deque

from capacity.cost_model import CostModel
from capacity.profile import Profile
from capacity.sim.config import PoolSpec, SimConfig
from capacity.sim.events import EventLoop
from capacity.sim.job import Job
from capacity.sim.options import SimOptions
from capacity.sim.replica import EngineReplica
from capacity.sim.request import SimRequest
from capacity.sim.result import ItlHistogram, PoolUse
from capacity.sim.router import SimRouter
from common.admission import AdmissionQueue, QueueFull
from common.errors import ErrorCode, RequestError
from common.worker_info import WorkerRole
from loadgen.record import RequestRecord


class Cluster:
    """Every replica and the router, on one event loop."""

    def __init__(
        self, config: SimConfig, profile: Profile, options: SimOptions, seed: int, log_steps: bool
    ) -> None:
        self.config = config
        self.profile = profile
        self.options = options
        self.loop = EventLoop()
        self.cost = CostModel(profile)
        from capacity.sim.steps import DecodeSteps

        self.steps = DecodeSteps(self.cost)
        self.log_steps = log_steps
        self.itl = None if log_steps else ItlHistogram()
        self.router = SimRouter(
            config.pool,
            self.loop.clock,
            # Load reports are only as fresh as the heartbeat: refreshing more often than
            # that re-reads the same reports (and costs a re-sort at 1,000 workers).
            refresh_interval_s=options.refresh_interval_s
            or max(config.refresh_interval_s, config.heartbeat_interval_s),
            prediction_ttl_s=config.prediction_ttl_s,
            seed=seed,
            index_events=options.index_events,
        )
        self.rpc_s = self.cost.overhead_s("rpc_s")
        self.busy_decode_delay_s = self.cost.busy_decode_handoff_s()
        self.decision_s = self.cost.router_decision_s()
        self.in_flight = 0
        self.gate: AdmissionQueue[Job] = AdmissionQueue(config.pool.max_queued)
        self.by_role: dict[WorkerRole, list[EngineReplica]] = {r: [] for r in WorkerRole}
        self.worker_queue: dict[str, AdmissionQueue[Job]] = {}
        self.prealloc: dict[str, deque[Job]] = {}
        self.records: list[RequestRecord] = []
        self.timeline: list[tuple[float, str, str, int]] = []
        self.use: dict[str, PoolUse] = {}
        self._next_id = 0
        self.open_requests = 0  # submitted and not yet finished or refused
        self.unsent = 0  # turns never sent (an earlier turn failed, or past max_start_s)
        self._next_turn: dict[str, SimRequest] = {}  # request id -> the session's next turn
        self._heads: deque[SimRequest] = deque()  # closed loop: sessions not started yet
        self.ttft_samples: dict[str, list[tuple[float, float]]] = {}
        self.itl_samples: dict[str, list[tuple[float, float]]] = {}
        self.queue_samples: dict[str, list[tuple[float, float]]] = {}
        self.misses = 0  # requests certainly missing options.miss_slo (stop early)

    # ---- replicas ------------------------------------------------------------------------

    def spec_of(self, role: WorkerRole) -> PoolSpec:
        spec = {
            WorkerRole.PREFILL: self.config.prefill,
            WorkerRole.DECODE: self.config.decode,
            WorkerRole.COLOCATED: self.config.colocated,
        }[role]
        assert spec is not None
        return spec

    def add_replica(self, role: WorkerRole) -> EngineReplica:
        spec = self.spec_of(role)
        self._next_id += 1
        worker_id = f"{role.value}-{self._next_id:04d}"
        blocks = spec.engine.num_kv_blocks or max(
            1, self.profile.num_kv_blocks // self.options.block_stride
        )
        feed = self.itl is not None and self.options.itl_histogram
        itl_sink = self.itl.add_ramp if feed else None  # type: ignore[union-attr]
        replica = EngineReplica(
            worker_id,
            role,
            spec,
            blocks,
            self.cost,
            self.steps,
            self.loop,
            self,
            log_steps=self.log_steps,
            itl_sink=itl_sink,
            per_step=self.options.per_step,
        )
        self.by_role[role].append(replica)
        self.worker_queue[worker_id] = AdmissionQueue(spec.admission_queue_size)
        self.prealloc[worker_id] = deque()
        self.router.add(replica)
        self._timeline(role)
        return replica

    def remove_replica(self, replica: EngineReplica) -> None:
        self.by_role[replica.role].remove(replica)
        self.router.remove(replica.worker_id)
        self._account(replica)
        self._timeline(replica.role)

    def live(self, role: WorkerRole) -> list[EngineReplica]:
        return [r for r in self.by_role[role] if not r.draining]

    def _timeline(self, role: WorkerRole) -> None:
        self.timeline.append(
            (self.loop.now, self.config.pool.name, role.value, len(self.live(role)))
        )

    def _account(self, replica: EngineReplica) -> None:
        use = self.use.setdefault(replica.role.value, PoolUse())
        use.busy_s += replica.busy_s
        replica.busy_s = 0.0

    # ---- arrivals and the router ---------------------------------------------------------

    def submit(self, requests: list[SimRequest]) -> None:
        """Schedule the sessions: open loop at their arrivals, or closed loop."""
        sessions: dict[str, list[SimRequest]] = {}
        for req in requests:
            sessions.setdefault(req.session_id or req.request_id, []).append(req)
        heads = []
        for turns in sessions.values():
            turns.sort(key=lambda r: r.turn)
            for a, b in itertools.pairwise(turns):
                self._next_turn[a.request_id] = b
            heads.append(turns[0])
        self.open_requests += len(requests)
        concurrency = self.options.concurrency
        if concurrency:
            self._heads.extend(sorted(heads, key=lambda r: r.arrival_s))
            for _ in range(min(concurrency, len(heads))):
                self.loop.at(0.0, self._arrive, self._heads.popleft())
            return
        for req in heads:
            if req.arrival_s <= self.options.max_start_s:
                self.loop.at(req.arrival_s, self._arrive, req)
            else:
                self._drop_session(req)

    def _ended(self, req: SimRequest, ok: bool) -> None:
        """A turn ended: send the session's next turn, or the client's next session."""
        nxt = self._next_turn.pop(req.request_id, None)
        if nxt is not None:
            if ok:
                self.loop.at(self.loop.now, self._arrive, nxt)
                return
            self._drop_session(nxt)
        if self.options.concurrency and self._heads:
            head = self._heads.popleft()
            if self.loop.now <= self.options.max_start_s:
                self.loop.at(self.loop.now, self._arrive, head)
            else:
                self._drop_session(head)
                while self._heads:
                    self._drop_session(self._heads.popleft())

    def _drop_session(self, req: SimRequest | None) -> None:
        """``req`` and its later turns are never sent (counted as unsent)."""
        while req is not None:
            self.unsent += 1
            self.open_requests -= 1
            req = self._next_turn.pop(req.request_id, None)

    def _arrive(self, req: SimRequest) -> None:
        now = self.loop.now
        record = RequestRecord(
            req.session_id or req.request_id,
            req.turn,
            req.group,
            req.arrival_s if not self.options.concurrency else now,
            sent_s=now,
        )
        record.prompt_tokens = req.prompt_tokens
        self.records.append(record)
        job = Job(req, record)
        if self.in_flight < self.config.pool.max_in_flight:
            self.in_flight += 1
            self.loop.at(self.loop.now + self.decision_s, self._decide, job)
            return
        try:
            displaced = self.gate.push(job, req.priority, req.client_id)
        except QueueFull:
            self._refuse(job)
            return
        if displaced is not None:
            self._refuse(displaced)

    def _refuse(self, job: Job, error: str = "") -> None:
        self.open_requests -= 1
        record = job.record
        record.end_s = self.loop.now
        if error:
            record.error = error
        else:
            record.refuse(None)
        if self.options.miss_slo is not None:
            self._missed(job)
        self._ended(job.req, False)

    def _decide(self, job: Job) -> None:
        req = job.req
        try:
            decision = self.router.decide(
                req.block_hashes, req.prompt_tokens, req.output_tokens, job.refused_by
            )
        except RequestError as exc:
            self._refuse(job, "" if exc.code is ErrorCode.RESOURCE_EXHAUSTED else exc.code.name)
            self._release_router_slot()
            return
        decode = self.router.replicas[decision.decode.worker_id]
        prefill_id = decision.prefill_worker_id
        prefill = self.router.replicas[prefill_id] if prefill_id is not None else None
        queue = self.worker_queue[decode.worker_id]
        full = decode.admission_active >= decode.spec.active_slots
        if full and len(queue) >= queue.max_queued:
            job.refused_by = job.refused_by | {decode.worker_id}
            self._decide(job)  # the router tries another decode worker at once
            return
        if self._too_large(job, decode, prefill):
            self._refuse(job)  # the whole cache could never hold it: refused for good
            self._release_router_slot()
            return
        self.router.routed(decision, req.block_hashes, req.prompt_tokens)
        job.decode, job.prefill, job.local = decode, prefill, prefill is None
        route = f"{prefill_id}->{decode.worker_id}" if prefill_id else decode.worker_id
        job.record.route = route
        decode.assigned += 1
        decode.touch()
        job.queued_s = self.loop.now
        if full:
            queue.push(job, req.priority, req.client_id)
        else:
            self._admit(job)

    def _too_large(self, job: Job, decode: EngineReplica, prefill: EngineReplica | None) -> bool:
        req = job.req
        if decode.blocks.blocks_for(job.context_at_finish) > decode.blocks.num_blocks:
            return True
        return prefill is not None and (
            prefill.blocks.blocks_for(req.prompt_tokens) > prefill.blocks.num_blocks
        )

    # ---- decode (or colocated) worker ----------------------------------------------------

    def _admit(self, job: Job) -> None:
        decode = job.decode
        assert decode is not None
        decode.admission_active += 1
        job.admitted_s = self.loop.now
        self._sample(self.queue_samples, decode.worker_id, job.admitted_s - job.queued_s)
        if job.local:
            decode.submit_prefill(job)
            return
        waiting = self.prealloc[decode.worker_id]
        waiting.append(job)
        if len(waiting) == 1:
            self._prealloc(decode)

    def _prealloc(self, decode: EngineReplica) -> None:
        """Reserve blocks for the head of the prealloc queue, FIFO, while they fit."""
        waiting = self.prealloc[decode.worker_id]
        pool = decode.blocks
        while waiting:
            job = waiting[0]
            need = pool.blocks_for(job.context_at_finish)
            if need > pool.num_free_blocks:
                return
            waiting.popleft()
            job.decode_blocks = pool.reserve(need)
            decode.touch()
            prefill = job.prefill
            assert prefill is not None
            prefill.assigned += 1
            prefill.touch()
            self.loop.at(self.loop.now + 2 * self.rpc_s, prefill.submit_prefill, job)

    def blocks_freed(self, replica: EngineReplica) -> None:
        if self.prealloc.get(replica.worker_id):
            self._prealloc(replica)

    def prefilled(self, replica: EngineReplica, job: Job, step_s: float) -> None:
        req = job.req
        if job.local:
            assert job.decode_blocks is not None
            replica.blocks.commit(job.decode_blocks, req.block_hashes)
            self._first_token(job, replica)
            return
        assert job.prefill_blocks is not None
        replica.blocks.commit(job.prefill_blocks, req.block_hashes)
        replica.assigned -= 1
        replica.touch()
        transfer = self.cost.transfer_s(self.cost.kv_bytes(req.prompt_tokens))
        if replica.spec.layer_wise:
            transfer = max(transfer - step_s, self.profile.transfer.latency_s)
        transfer += self.cost.handoff_s(req.prompt_tokens)
        self.loop.at(self.loop.now + transfer, self._landed, job)

    def _landed(self, job: Job) -> None:
        prefill, decode = job.prefill, job.decode
        assert prefill is not None and decode is not None and job.decode_blocks is not None
        prefill.release_prefill(job)
        decode.blocks.commit(job.decode_blocks, job.req.block_hashes)
        if self.busy_decode_delay_s and not decode.idle:
            # The decode replica is mid-step: the sequence joins at its next boundary as
            # usual, but the worker's loop sends the first token late. Capped at the
            # shortest decode step, so it never goes out after the second token.
            delay = min(self.busy_decode_delay_s, self.cost.decode_step_s(1, 0))
            self._first_token(job, prefill, self.loop.now + delay)
        else:
            self._first_token(job, prefill)

    def _first_token(self, job: Job, computed_on: EngineReplica, at: float | None = None) -> None:
        """The first token is out (recorded at ``at``, default now); the request joins its
        decode replica's batch now, or ends if that was its only token."""
        now = self.loop.now if at is None else at
        job.first_token_s = now
        record = job.record
        record.add_chunk(now, 1)
        record.cached_tokens = job.cached
        slo = self.options.miss_slo
        if slo is not None and (now - record.sent_s) * 1e3 > slo.ttft_bound_ms(
            record.prompt_tokens
        ):
            self._missed(job)  # its TTFT (the record's: first chunk - sent) is over the bound
        self.router.first_token(computed_on.worker_id, job.req.prompt_tokens)
        self._sample(self.ttft_samples, computed_on.worker_id, now - job.admitted_s)
        decode = job.decode
        assert decode is not None
        if job.req.output_tokens == 1:
            if job.decode_blocks is not None:
                decode.blocks.release(job.decode_blocks)
                job.decode_blocks = None
                self.blocks_freed(decode)
            self._done(job, now)
        else:
            decode.join(job)

    def finished(self, replica: EngineReplica, job: Job) -> None:
        now = self.loop.now
        record = job.record
        if self.log_steps:
            times = replica.token_times(job)
            record.chunk_times.extend(times)
            record.chunk_tokens.extend([1] * len(times))
        else:
            record.add_chunk(now, job.req.output_tokens - 1)
        out = job.req.output_tokens
        if out > 1:
            self._sample(self.itl_samples, replica.worker_id, (now - job.first_token_s) / (out - 1))
        self._done(job, now)

    def _done(self, job: Job, now: float) -> None:
        self.open_requests -= 1
        record = job.record
        record.end_s = now
        record.output_tokens = job.req.output_tokens
        record.finish_reason = "length"
        slo = self.options.miss_slo
        if slo is not None and not job.missed and not slo.met_by(record):
            self._missed(job)
        decode = job.decode
        assert decode is not None
        decode.assigned -= 1
        decode.touch()
        decode.admission_active -= 1
        ids = (
            (decode.worker_id,)
            if job.prefill is None
            else (job.prefill.worker_id, decode.worker_id)
        )
        self.router.closed(ids)
        nxt = self.worker_queue[decode.worker_id].pop()
        if nxt is not None:
            self._admit(nxt)
        self._release_router_slot()
        if decode.draining and decode.assigned == 0:
            self.remove_replica(decode)
        prefill = job.prefill
        if (
            prefill is not None
            and prefill.draining
            and prefill.assigned == 0
            and not prefill.waiting
            and prefill in self.by_role[prefill.role]
        ):
            self.remove_replica(prefill)
        self._ended(job.req, True)

    def _missed(self, job: Job) -> None:
        """``job`` misses the stop-early SLO whatever happens next; past the limit, stop."""
        job.missed = True
        self.misses += 1
        if self.misses > self.options.miss_limit:
            self.loop.stop()

    def _release_router_slot(self) -> None:
        nxt = self.gate.pop()
        if nxt is None:
            self.in_flight -= 1
            return
        self.loop.at(self.loop.now + self.decision_s, self._decide, nxt)

    def _sample(
        self, store: dict[str, list[tuple[float, float]]], worker_id: str, value: float
    ) -> None:
        samples = store.setdefault(worker_id, [])
        samples.append((self.loop.now, value))
        if len(samples) > 4096:
            cut = self.loop.now - self.config.latency_window_s
            store[worker_id] = [s for s in samples if s[0] >= cut]
