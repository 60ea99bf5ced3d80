"""One Prefill request's life on a prefill worker.

Queues, per request::

    admission  waits for one of the worker's active slots (worker.admission): priority
               first, callers round robin; a full queue refuses at once with
               RESOURCE_EXHAUSTED and a retry-after hint (the decode worker then prefills
               locally or elsewhere). The slot is held until the RPC answers.
    bootstrap  validated (prompt, block count, receiver address) and its KV send planned;
               handed to the engine thread, which takes new requests between steps.
    waiting    in the engine: queued FIFO for the per-step token budget and KV blocks,
               then prefilled — batched with other prompts, in chunks if long, skipping
               what the prefix cache already holds.
    in flight  its last chunk is being computed: the KV send to the decode worker starts
               (layer-wise: at the step's first layer, see :mod:`prefill_worker.sends`);
               the first token is sampled; the RPC answers once the KV has landed.

The engine keeps the prompt's blocks (``hold_blocks``) until the send is terminal, then
they stay in the prefix cache, unreferenced, for the next prompt that shares the prefix.
A cancelled RPC (the decode worker gave up or died) or a failed send frees them at once:
the live transfer is aborted first, then the engine request — in that order, so no block
is freed while the transport still reads it. That ordering is why the engine stream runs
in its own task rather than in the (cancellable) handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time

from common.admission_gate import Refused
from common.errors import ErrorCode, RequestError, invalid
from common.logprobs import TokenLogprob
from common.sampling import SamplingParams
from engine.async_engine import AsyncEngine
from engine.outputs import StepOutput
from kv_transfer.types import PeerAddress, TransferState
from messages.prefill import PrefillJob, PrefillResult
from prefill_worker.sends import SendPlan, SendTracker
from prefill_worker.stats import PrefillStats
from worker.admission import WorkerAdmission
from worker.latency import LatencyWindow


class Prefiller:
    """Runs Prefill requests against one engine; see the module docstring."""

    def __init__(
        self,
        engine: AsyncEngine,
        sends: SendTracker,
        stats: PrefillStats,
        queue: WorkerAdmission,
    ) -> None:
        self.queue = queue  # the admission queue, before bootstrap
        self.draining = False
        self.active = 0
        self.queued_tokens = 0  # prompt tokens accepted and not yet prefilled (for routers)
        self.ttft_window = LatencyWindow()
        self._engine = engine
        self._sends = sends
        self._stats = stats
        self._ids = itertools.count()

    async def run(self, job: PrefillJob) -> PrefillResult:
        if self.draining:
            raise RequestError(ErrorCode.UNAVAILABLE, "worker is draining")
        peer = self._check(job)
        started = time.monotonic()
        self.queued_tokens += len(job.prompt)  # until computed (or refused)
        try:
            async with self.queue.admitted(job.priority, job.client_id, job.deadline):
                return await self._admitted(job, peer, started)
        except Refused as exc:  # by the admission queue: nothing was started
            self.queued_tokens -= len(job.prompt)
            self._stats.finished(exc.code.value.lower())
            raise

    async def _admitted(self, job: PrefillJob, peer: PeerAddress, started: float) -> PrefillResult:
        """Prefill and send, holding an admission slot; queued_tokens drops once computed."""
        rid = f"{job.request_id}#{next(self._ids)}"
        plan = SendPlan(job.transfer_id, peer, job.num_blocks, job.layer_wise, job.deadline)
        pending = self._sends.track(rid, plan)
        first_only = dataclasses.replace(job.params, max_tokens=1)
        compute = asyncio.create_task(self._compute(rid, job.prompt, first_only))
        compute.add_done_callback(_retrieve)
        self.active += 1
        outcome = "cancelled"
        try:
            try:
                first = await asyncio.shield(compute)
            except ValueError as exc:  # the engine refused the prompt
                raise invalid(str(exc)) from None
            finally:  # computed, failed or cancelled: no longer waiting for prefill
                self.queued_tokens -= len(job.prompt)
            self._stats.prefilled(time.monotonic() - started, first)
            self.ttft_window.add(time.monotonic() - started)
            transfer = pending.transfer
            if transfer is None:
                raise RequestError(ErrorCode.INTERNAL, pending.error or "no KV send started")
            state = await pending.done
            self._stats.transfer(transfer.metrics)
            if state is not TransferState.DONE:
                raise RequestError(ErrorCode.UNAVAILABLE, f"KV send failed: {transfer.error}")
            m = transfer.metrics
            outcome = "ok"
            return PrefillResult(
                first_token=first.new_token_ids[0],
                cached_tokens=first.cached_tokens,
                prompt_tokens=first.prompt_tokens,
                kv_bytes=m.bytes if m else 0,
                transfer_seconds=m.duration_s if m else 0.0,
                first_logprob=first.logprobs[0] if first.logprobs else None,
                prompt_logprobs=_maybe_tuple(first.prompt_logprobs),
            )
        except RequestError as exc:
            outcome = exc.code.value.lower()  # metric labels stay lower case
            raise
        finally:
            self._sends.close(pending)  # first: the transport lets go of the blocks
            compute.cancel()  # then: an unfinished engine request is aborted
            self.active -= 1
            self._stats.finished(outcome)

    def _check(self, job: PrefillJob) -> PeerAddress:
        try:
            self._engine.validate_prompt(list(job.prompt))
            peer = PeerAddress.parse(job.kv_address)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        if not job.transfer_id:
            raise invalid("transfer_id is empty")
        expected = self._engine.blocks_for_prompt(len(job.prompt))
        if job.num_blocks != expected:
            raise invalid(
                f"{len(job.prompt)} prompt tokens fill {expected} blocks, "
                f"{job.num_blocks} were reserved"
            )
        return peer

    async def _compute(
        self, rid: str, prompt: tuple[int, ...], params: SamplingParams
    ) -> StepOutput:
        stream = self._engine.generate(rid, list(prompt), params, hold_blocks=True)
        last: StepOutput | None = None
        async with contextlib.aclosing(stream):
            async for out in stream:
                last = out
        if last is None or not last.new_token_ids:
            raise RuntimeError(f"{rid}: the engine finished without a first token")
        return last


def _maybe_tuple(items: list[TokenLogprob] | None) -> tuple[TokenLogprob, ...] | None:
    return None if items is None else tuple(items)


def _retrieve(task: asyncio.Task[StepOutput]) -> None:
    # The handler may be gone (cancelled) when the task fails; do not log it as unretrieved.
    if not task.cancelled():
        task.exception()
