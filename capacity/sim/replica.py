"""One worker replica's engine: a prefill waiting queue and a continuous decode batch.

The same model serves every role. A prefill replica only ever has prefill work; a decode
replica has a running batch and, for local prefills, prefill work; a colocated replica
has both. A step is either

- **mixed**: prefill chunks (the real scheduler's two passes and PrefillPolicy under the
  token budget ``max_num_batched_tokens`` less one token per running sequence, at most
  ``max_num_seqs`` sequences in all) plus
  one decode token for every running sequence; it costs
  ``cost.mixed_step_s(chunk tokens, context they attend, batch, context, local)`` (both
  tables, the per-step worker overhead once; ``local`` unless this is a prefill replica); or
- **a run** (no prefill work): ``m`` decode steps of a fixed batch, ``m`` = steps until
  the first sequence finishes, costed in closed form (:mod:`capacity.sim.steps`) and
  scheduled as one event. A join (a prefilled request arriving, a local prefill) cuts the
  run after the step in progress, exactly where the real scheduler would add it; a step
  that joins a remotely prefilled request starts ``cost.first_decode_extra_s(...)`` late
  (one figure for a join into a running batch, one for an idle replica).

The running batch is tracked without per-sequence work per step: a global step counter,
each sequence's ``finish_step`` in a heap, and the batch's total context (``+batch`` per
step). Per-token times are recovered from the step log when ``log_steps`` is on (every
decode step's end time: what per-request ITLs are built from); otherwise each run adds its
step times to an ITL histogram (:class:`~capacity.sim.result.ItlHistogram`), weighted by
the batch.

KV blocks: :class:`~capacity.sim.blocks.BlockPool`. A locally prefilled or colocated
request allocates prompt + output blocks when first scheduled (prefix hits reused); a
remote prefill allocates the prompt's blocks on the prefill replica and keeps them until
its transfer lands; the decode side's blocks are reserved by the caller (prealloc).
Preemption is not modelled: a request's blocks are held from admission to finish.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from typing import Protocol

from capacity.cost_model import CostModel
from capacity.sim.blocks import BlockPool
from capacity.sim.config import PoolSpec
from capacity.sim.events import EventLoop
from capacity.sim.job import Job
from capacity.sim.steps import DecodeSteps
from common.worker_info import WorkerRole
from engine.prefill_policy import PrefillPolicy


class Sink(Protocol):
    """What a replica tells the cluster."""

    def prefilled(self, replica: EngineReplica, job: Job, step_s: float) -> None: ...

    def finished(self, replica: EngineReplica, job: Job) -> None: ...

    def blocks_freed(self, replica: EngineReplica) -> None: ...


class EngineReplica:
    """One replica; ``submit_prefill`` / ``join`` feed it, the sink hears the results."""

    def __init__(
        self,
        worker_id: str,
        role: WorkerRole,
        spec: PoolSpec,
        num_blocks: int,
        cost: CostModel,
        steps: DecodeSteps,
        loop: EventLoop,
        sink: Sink,
        *,
        log_steps: bool,
        itl_sink: Callable[[int, float, float, int], None] | None = None,
        per_step: bool = False,
    ) -> None:
        self.worker_id = worker_id
        self.role = role
        self.spec = spec
        self.blocks = BlockPool(
            num_blocks, spec.engine.block_size, spec.engine.enable_prefix_caching
        )
        self.cost = cost
        self._first_extra = cost.first_decode_extra_s(into_running_batch=False)
        self._join_running_extra = cost.first_decode_extra_s(into_running_batch=True)
        self.steps = steps
        self.loop = loop
        self.sink = sink
        self.per_step = per_step  # reference mode: one event per decode step
        self.log_steps = log_steps
        self.itl_sink = itl_sink  # (weight per gap, first gap, last gap, gaps): a ramp
        self.budget = spec.engine.max_num_batched_tokens
        self.policy = PrefillPolicy(spec.engine.long_prefill_token_threshold)
        self.max_seqs = spec.engine.max_num_seqs
        # queues
        self.waiting: deque[Job] = deque()  # prefill work, FIFO
        # the scheduler's walk of ``waiting`` stops once nothing later can change (see
        # _schedule_prefill): its jobs with blocks here, and its unstarted short prompts
        self._started: list[Job] = []
        self._short_waiting = 0
        self.joining: list[Job] = []  # prefilled, joining the batch at the next boundary
        self.running: list[tuple[int, int, Job]] = []  # heap of (finish_step, seq, job)
        self.num_running = 0
        self._seq = 0
        # decode state
        self.steps_done = 0
        self.context = 0  # total KV tokens of the running batch
        self.step_log: list[float] = []  # end time of each decode step (log_steps)
        # the step in flight
        self._gen = 0
        self._busy = False
        self._run: tuple[float, int, int, int] | None = None  # (t0, batch, context0, m)
        self._chunks: list[tuple[Job, int]] = []
        self._end = 0.0
        self._step_s = 0.0
        # bookkeeping the router / autoscaler read
        self.draining = False
        self.queued_prefill_tokens = 0
        self.busy_s = 0.0  # time spent in steps (utilisation)
        self.admission_active = 0  # slots held (decode / colocated admission)
        self.assigned = 0  # requests routed here and not finished (router view)
        self.dirty: set[str] | None = None  # the router's: replicas whose load changed

    def touch(self) -> None:
        """Something a load report shows changed (the router rebuilds this one's view)."""
        if self.dirty is not None:
            self.dirty.add(self.worker_id)

    # ---- inputs --------------------------------------------------------------------------

    def submit_prefill(self, job: Job) -> None:
        """Queue a prompt to compute here (remote prefill, local, or colocated)."""
        self.waiting.append(job)
        if job.scheduled:
            self._started.append(job)
        elif not self.policy.is_long(job.remaining):
            self._short_waiting += 1
        self.queued_prefill_tokens += job.remaining
        self.touch()
        self._wake()

    def join(self, job: Job) -> None:
        """A prefilled request joins the running batch at the next step boundary."""
        self.joining.append(job)
        self.touch()
        self._wake()

    @property
    def batch(self) -> int:
        return self.num_running + len(self.joining)

    @property
    def idle(self) -> bool:
        return not self._busy

    # ---- stepping ------------------------------------------------------------------------

    def _wake(self) -> None:
        if not self._busy:
            self._start(self.loop.now)
        elif self._run is not None:
            self._cut(self.loop.now)

    def _cut(self, now: float) -> None:
        """End the run after the step in progress at ``now``."""
        t0, batch, context0, m = self._run  # type: ignore[misc]
        done = self.steps.steps_within(batch, context0, m, now - t0)
        if done + 1 >= m:
            return
        self._run = (t0, batch, context0, done + 1)
        self._end = t0 + self.steps.sum_s(batch, context0, done + 1)
        self._gen += 1
        self.loop.at(self._end, self._finish_step, self._gen)

    def _start(self, t: float) -> None:
        """Begin the next step at ``t`` (a boundary): joins first, then prefill or a run."""
        already_running = self.num_running
        for job in self.joining:
            self._seq += 1
            job.join_step = self.steps_done
            job.finish_step = self.steps_done + job.req.output_tokens - 1
            heapq.heappush(self.running, (job.finish_step, self._seq, job))
            self.context += job.req.prompt_tokens + 1
        self.num_running += len(self.joining)
        joined, self.joining = self.joining, []
        self._chunks = self._schedule_prefill() if self.waiting else []
        batch = self.num_running
        # the first step of a remotely prefilled sequence pays its join (profile overhead)
        extra = 0.0
        if any(not job.local for job in joined):
            extra = self._join_running_extra if already_running else self._first_extra
        if self._chunks:
            new = sum(n for _, n in self._chunks)
            attended = sum(job.computed for job, _ in self._chunks)
            local = self.role is not WorkerRole.PREFILL
            duration = extra + self.cost.mixed_step_s(new, attended, batch, self.context, local)
            self._run = None
            self._step_s = duration
            first = duration
        elif batch:
            m = 1 if self.per_step else self.running[0][0] - self.steps_done
            duration = extra + self.steps.sum_s(batch, self.context, m)
            self._run = (t + extra, batch, self.context, m)  # the run starts after the join
            self.busy_s += extra
            first = extra + self.steps.step_s(batch, self.context)
        else:
            self._busy = False
            self._run = None
            return
        if self.itl_sink is not None:
            for job in joined:
                self.itl_sink(1, t + first - job.first_token_s, 0.0, 1)
            if batch > len(joined):
                self.itl_sink(batch - len(joined), first, 0.0, 1)
        self._busy = True
        self._end = t + duration
        self._gen += 1
        self.loop.at(self._end, self._finish_step, self._gen)

    def _schedule_prefill(self) -> list[tuple[Job, int]]:
        """This step's prefill chunks, in the real scheduler's two passes with the real
        :class:`engine.prefill_policy.PrefillPolicy` (engine/scheduler.py): FIFO, long
        prompts capped at the threshold and started one at a time; then the leftover
        budget tops the capped chunks up and admits what was passed over. Admission stops
        at the first prompt whose blocks do not fit.

        Each pass stops walking the queue once no job left in it can change the step: in
        pass 1 no started job is left and every unstarted one would be passed over
        (blocked, or long behind a long one: ``may_admit`` refuses exactly the long ones
        then); in pass 2 no chunked job is left and none can be admitted. Same chunks as
        walking to the end, without the walk over a long overloaded queue every step."""
        policy = self.policy
        is_long, may_admit, first_chunk = policy.is_long, policy.may_admit, policy.first_chunk
        waiting, started = self.waiting, self._started
        left = self.budget - self.num_running
        seqs = self.max_seqs - self.num_running
        long_in_progress = any(is_long(j.remaining) for j in started)
        chunks: dict[Job, int] = {}
        blocked = False
        started_left, short_left = len(started), self._short_waiting
        unstarted_left = len(waiting) - started_left
        for job in waiting:  # pass 1
            if left <= 0 or seqs <= 0:
                break
            if not started_left and (
                blocked or not unstarted_left or (long_in_progress and not short_left)
            ):
                break  # every job left would be passed over
            if job.scheduled:
                started_left -= 1
            else:
                unstarted_left -= 1
                if not is_long(job.remaining):
                    short_left -= 1
                if blocked or not may_admit(job.remaining, long_in_progress):
                    continue
                if not self._allocate(job):
                    blocked = True  # head-of-line: later prompts wait for blocks too
                    continue
                long_in_progress = long_in_progress or is_long(job.remaining)
            n = first_chunk(job.remaining, left)
            if n > 0:
                chunks[job] = n
                left -= n
                seqs -= 1
        chunked_left = len(chunks)
        unstarted_left = len(waiting) - len(started)
        for job in waiting:  # pass 2: top up, then admit uncapped
            if left <= 0:
                break
            if not chunked_left and (blocked or seqs <= 0 or not unstarted_left):
                break  # nothing left to top up or admit
            if job in chunks:
                chunked_left -= 1
                more = min(job.remaining - chunks[job], left)
                chunks[job] += more
                left -= more
            elif not job.scheduled:
                unstarted_left -= 1
                if blocked or seqs <= 0:
                    continue
                if not self._allocate(job):
                    blocked = True
                    continue
                n = min(job.remaining, left)
                chunks[job] = n
                left -= n
                seqs -= 1
        return [(job, n) for job, n in chunks.items() if n > 0]

    def _allocate(self, job: Job) -> bool:
        """Blocks for a prompt scheduled here for the first time; prefix hits reused."""
        req, pool = job.req, self.blocks
        local = job.prefill is None
        tokens = req.prompt_tokens + (req.output_tokens if local else 0)
        total = pool.blocks_for(tokens)
        holding = pool.try_allocate(req.block_hashes, req.prompt_tokens, total)
        if holding is None:
            return False
        if not self.policy.is_long(job.remaining):
            self._short_waiting -= 1
        self._started.append(job)
        cached = len(holding.cached) * pool.block_size
        job.cached = job.computed = cached
        job.remaining = req.prompt_tokens - cached
        self.queued_prefill_tokens -= cached
        job.scheduled = True
        job.started_s = self.loop.now
        if local:
            job.decode_blocks = holding
        else:
            job.prefill_blocks = holding
        return True

    def _finish_step(self, gen: int) -> None:
        if gen != self._gen:
            return  # a cut run's old end
        now = self._end
        self.touch()
        if self._run is not None:
            t0, batch, context0, m = self._run
            self.busy_s += now - t0
            if self.log_steps:
                self.step_log.extend(self.steps.step_times(batch, context0, m, t0))
            if self.itl_sink is not None and m > 1:  # the run's first step: at _start
                self.itl_sink(
                    batch,
                    self.steps.step_s(batch, context0 + batch),
                    self.steps.step_s(batch, context0 + (m - 1) * batch),
                    m - 1,
                )
            self.steps_done += m
            self.context += batch * m
        else:
            self.busy_s += self._step_s
            batch = self.num_running
            if batch:
                if self.log_steps:
                    self.step_log.append(now)
                self.steps_done += 1
                self.context += batch
            for job, n in self._chunks:
                job.remaining -= n
                job.computed += n
                self.queued_prefill_tokens -= n
            for job, _ in self._chunks:
                if job.remaining == 0:
                    self.waiting.remove(job)
                    self._started.remove(job)
                    self.sink.prefilled(self, job, self._step_s)
            self._chunks = []
        self._retire()
        self._start(now)

    def release_prefill(self, job: Job) -> None:
        """A remote prefill's transfer landed: its blocks become prefix cache here."""
        if job.prefill_blocks is not None:
            self.blocks.release(job.prefill_blocks)
            job.prefill_blocks = None
            self.touch()
            if self.waiting and not self._busy:
                self._start(self.loop.now)

    def _retire(self) -> None:
        running, done = self.running, self.steps_done
        freed = False
        while running and running[0][0] <= done:
            _, _, job = heapq.heappop(running)
            self.num_running -= 1
            self.context -= job.context_at_finish
            if job.decode_blocks is not None:
                self.blocks.release(job.decode_blocks)
                job.decode_blocks = None
                freed = True
            self.sink.finished(self, job)
        if freed:
            self.sink.blocks_freed(self)
            # (the caller's _start picks up waiting prefills that were short of blocks)

    def token_times(self, job: Job) -> list[float]:
        """Every decode token's time of a finished ``job`` (needs ``log_steps``)."""
        return self.step_log[job.join_step : job.finish_step]

    def wake(self) -> None:
        """Start a step if idle and there is work (blocks were freed elsewhere)."""
        if not self._busy and (self.waiting or self.joining or self.num_running):
            self._start(self.loop.now)
