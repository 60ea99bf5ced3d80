"""One Decode request's life on a decode worker — or on a colocated one.

Queues, per request::

    admission waits for one of the worker's active slots (worker.admission): priority
              first, callers round robin; a full queue refuses at once with
              RESOURCE_EXHAUSTED and a retry-after hint. The slot is held until the end.
    prealloc  validated; waits (FIFO) until the prompt's KV blocks can be reserved.
              Admission control: a prompt the whole cache could never hold is refused
              with RESOURCE_EXHAUSTED instead of waiting forever.
    transfer  blocks reserved and registered with the KV receiver; the prefill worker
              computes the prompt and its first token and sends the KV into them
              (Prefill RPC + landing, bounded by ``prefill_timeout_s``).
    running   joined to the engine's continuous batch; token ids stream back, the first
              one (sampled by the prefill worker) right after the KV has landed.

A request that names no prefill worker — every request on a colocated worker, which has
no KV receiver — skips prealloc and transfer: the engine prefills it in its own waiting
queue, then it runs. If the prefill worker fails or times out, the reservation is freed
and the request is prefilled here (policy ``local``, the default) or fails UNAVAILABLE
(policy ``fail``). Deadlines and cancellation may strike in any queue; the cleanup of
each stage is synchronous, so a cancelled coroutine still frees every block: a live
transfer is aborted (the transport stops touching the blocks), then the reservation is
given back; once running, the engine stream aborts the request when it is abandoned.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from common.errors import ErrorCode, RequestError, invalid
from common.generation import FinishReason, Usage
from common.logprobs import TokenLogprob
from decode_worker.admission import Admission, Reservation
from decode_worker.prefill_client import PrefillClient, PrefillFailed
from decode_worker.stats import DecodeStats
from engine.async_engine import AsyncEngine
from engine.outputs import StepOutput
from kv_transfer.interfaces import KVReceiver
from kv_transfer.transfer import Transfer
from kv_transfer.types import RecvSpec, TransferState
from messages.decode import DecodeJob, TokenDelta
from messages.prefill import PrefillJob, PrefillResult
from worker.admission import WorkerAdmission
from worker.config import PrefillFailurePolicy

LOCAL = "local"  # ``prefilled_by`` of a request prefilled on this worker


@dataclass(frozen=True, slots=True)
class DecodePolicy:
    worker_id: str
    prefill_timeout_s: float
    on_prefill_failure: PrefillFailurePolicy
    layer_wise: bool


class Decoder:
    """Runs Decode requests against one engine; see the module docstring."""

    def __init__(
        self,
        policy: DecodePolicy,
        engine: AsyncEngine,
        receiver: KVReceiver | None,
        prefill: PrefillClient,
        stats: DecodeStats,
        queue: WorkerAdmission,
    ) -> None:
        self.policy = policy
        self.queue = queue  # the admission queue, before prealloc
        self.draining = False
        self._engine = engine
        self._receiver = receiver
        self._prefill = prefill
        self._stats = stats
        self._admission = Admission(engine)
        self._ids = itertools.count()
        self.in_transfer = 0
        self.active = 0

    @property
    def prealloc_depth(self) -> int:
        return self._admission.depth

    async def run(self, job: DecodeJob) -> AsyncIterator[TokenDelta]:
        if self.draining:
            self._stats.rejected(ErrorCode.UNAVAILABLE)
            raise RequestError(ErrorCode.UNAVAILABLE, "worker is draining")
        try:
            self._check(job)
        except RequestError as exc:
            self._stats.rejected(exc.code)
            raise
        # Engine ids are ours: a client reusing a request id must not collide in the engine.
        rid = f"{job.request_id}#{next(self._ids)}"
        self.active += 1
        started = time.monotonic()
        try:
            async with self.queue.admitted(job.priority, job.client_id, job.deadline):
                deltas = self._admitted(job, rid, started)
                async with contextlib.aclosing(deltas):
                    async for delta in deltas:
                        yield delta
        except RequestError as exc:
            self._stats.rejected(exc.code)
            raise
        finally:
            self.active -= 1

    async def _admitted(
        self, job: DecodeJob, rid: str, started: float
    ) -> AsyncIterator[TokenDelta]:
        """The request's stages once it holds an admission slot (TTFT from ``started``)."""
        outcome: PrefillResult | None = None
        reservation: Reservation | None = None
        if job.prefill is not None and self._receiver is not None:
            reservation = await self._preallocate(job)
            try:
                outcome = await self._transfer(job, rid, reservation)
            finally:
                if outcome is None:
                    self._admission.give_back(reservation)
        if outcome is None:
            stream = self._engine.generate(rid, list(job.prompt), job.params)
            deltas = self._stream(stream, started, LOCAL)
        else:
            assert reservation is not None and job.prefill is not None
            deltas = self._run_prefilled(job, rid, reservation, outcome, started)
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                yield delta

    # ---- checks -----------------------------------------------------------------------

    def _check(self, job: DecodeJob) -> None:
        engine = self._engine  # immutable facts only: safe off the engine thread
        layout = engine.layout
        ids = job.prompt
        fits_otherwise = 0 < len(ids) < engine.max_model_len and all(
            0 <= t < engine.vocab_size for t in ids
        )
        if fits_otherwise and engine.blocks_for_prompt(len(ids) + 1) > layout.num_blocks:
            raise RequestError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"a prompt of {len(ids)} tokens can never fit this worker's "
                f"{layout.num_blocks} KV blocks of {layout.block_size} tokens",
            )
        try:
            engine.validate_prompt(list(ids))
        except ValueError as exc:
            raise invalid(str(exc)) from None

    # ---- prealloc -----------------------------------------------------------------------

    async def _preallocate(self, job: DecodeJob) -> Reservation:
        count = self._engine.blocks_for_prompt(len(job.prompt))
        try:
            async with asyncio.timeout_at(_loop_time(job.deadline)):
                return await self._admission.reserve(count)
        except TimeoutError:
            raise RequestError(
                ErrorCode.DEADLINE_EXCEEDED, "deadline passed waiting for KV blocks"
            ) from None

    # ---- transfer -----------------------------------------------------------------------

    async def _transfer(
        self, job: DecodeJob, rid: str, reservation: Reservation
    ) -> PrefillResult | None:
        """Prefill remotely into ``reservation``; None when the fallback is to prefill here."""
        assert self._receiver is not None and job.prefill is not None and reservation.block_ids
        budget = self.policy.prefill_timeout_s
        if job.deadline is not None:
            budget = min(budget, job.deadline - time.monotonic())
        if budget <= 0:
            raise RequestError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed before prefill")
        loop = asyncio.get_running_loop()
        landed: asyncio.Future[TransferState] = loop.create_future()

        def on_release(transfer: Transfer) -> None:  # any thread; exactly once
            with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                loop.call_soon_threadsafe(_resolve, landed, transfer.state)

        transfer_id = f"{self.policy.worker_id}/{rid}"
        spec = RecvSpec(transfer_id, tuple(reservation.block_ids), timeout_s=budget)
        transfer = self._receiver.expect(spec, on_release)
        prefill_job = PrefillJob(
            request_id=job.request_id,
            prompt=job.prompt,
            params=job.params,
            transfer_id=transfer_id,
            kv_address=str(self._receiver.address),
            num_blocks=reservation.num_blocks,
            layer_wise=self.policy.layer_wise,
            deadline=time.monotonic() + budget,
            priority=job.priority,
            client_id=job.client_id,
        )
        self.in_transfer += 1
        try:
            async with asyncio.timeout(budget):
                outcome = await self._prefill.prefill(job.prefill.grpc_address, prefill_job)
                state = await landed  # the prefill worker answers after landing: no wait
            if state is TransferState.DONE:
                return outcome
            reason, detail = "transfer", f"KV transfer {transfer.state.value}: {transfer.error}"
        except PrefillFailed as exc:
            reason, detail = exc.reason, str(exc)
        except TimeoutError:
            reason, detail = "timeout", f"no prefill within {budget:.1f}s"
        finally:
            # Synchronous, so it also runs to completion in a cancelled coroutine: after
            # it the transport no longer touches the blocks and they may be freed.
            transfer.abort("decode side gave up")
            self.in_transfer -= 1
            self._stats.transfer(transfer.metrics)
        if job.deadline is not None and time.monotonic() >= job.deadline:
            raise RequestError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed in prefill")
        fallback = self.policy.on_prefill_failure is PrefillFailurePolicy.LOCAL
        self._stats.prefill_failed(reason, fallback)
        if not fallback:
            raise RequestError(
                ErrorCode.UNAVAILABLE, f"prefill by {job.prefill.worker_id} failed: {detail}"
            )
        return None

    # ---- running ------------------------------------------------------------------------

    async def _run_prefilled(
        self,
        job: DecodeJob,
        rid: str,
        reservation: Reservation,
        outcome: PrefillResult,
        started: float,
    ) -> AsyncIterator[TokenDelta]:
        assert job.prefill is not None and reservation.block_ids is not None
        # The first token goes out before the request even joins the batch: TTFT is the
        # prefill worker's, not one decode step later.
        try:
            self._stats.first_token(time.monotonic() - started)
            usage = Usage(len(job.prompt), 1, outcome.cached_tokens)
            yield TokenDelta(
                (outcome.first_token,),
                None,
                usage,
                job.prefill.worker_id,
                logprobs=_first_logprobs(job, outcome),
                prompt_logprobs=outcome.prompt_logprobs if job.params.prompt_logprobs else None,
            )
        except BaseException:
            self._admission.give_back(reservation)
            raise
        stream = self._engine.decode_prefilled(
            rid, list(job.prompt), outcome.first_token, reservation.block_ids, job.params
        )
        reservation.handed_over = True  # the engine owns the blocks once it adds the request
        try:
            deltas = self._stream(stream, time.monotonic(), None, 1, outcome.cached_tokens)
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    yield delta
        except ValueError as exc:
            # add_prefilled refused the request, so the blocks are still ours.
            reservation.handed_over = False
            self._admission.give_back(reservation)
            raise RequestError(ErrorCode.INTERNAL, f"could not join the batch: {exc}") from None

    async def _stream(
        self,
        stream: AsyncIterator[StepOutput],
        since: float,
        first_by: str | None,
        sent: int = 0,
        cached_tokens: int = 0,
    ) -> AsyncIterator[TokenDelta]:
        """Engine outputs → deltas. With ``first_by`` (who prefilled) the stream's first
        output is the request's first token; without, that token was sent already."""
        first = first_by is not None
        outcome = "cancelled"
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    now = time.monotonic()
                    tokens = tuple(out.new_token_ids)
                    if first:
                        self._stats.first_token(now - since)
                        cached_tokens = out.cached_tokens
                    else:
                        self._stats.next_tokens(now - since, len(tokens))
                    since = now
                    sent += len(tokens)
                    reason = None
                    if out.finished:
                        reason = out.finish_reason or FinishReason.STOP
                        outcome = reason.value
                    # first and last: a router that ends the stream early (a stop string)
                    # still knows the prompt's cached tokens
                    usage = (
                        Usage(out.prompt_tokens, sent, cached_tokens) if first or reason else None
                    )
                    by = (first_by or "") if first else ""
                    yield TokenDelta(
                        tokens,
                        reason,
                        usage,
                        by,
                        logprobs=_maybe_tuple(out.logprobs),
                        prompt_logprobs=_maybe_tuple(out.prompt_logprobs),
                    )
                    first = False
        finally:
            self._stats.finished(outcome, sent, cached_tokens)
            if (spec := getattr(self._engine, "speculative_stats", None)) is not None:
                self._stats.speculative(spec())


def _first_logprobs(job: DecodeJob, outcome: PrefillResult) -> tuple[TokenLogprob, ...] | None:
    """The prefill-sampled first token's log-prob, as the first delta carries it."""
    if job.params.logprobs is None or outcome.first_logprob is None:
        return None
    return (outcome.first_logprob,)


def _maybe_tuple(items: list[TokenLogprob] | None) -> tuple[TokenLogprob, ...] | None:
    return None if items is None else tuple(items)


def _resolve(future: asyncio.Future[TransferState], state: TransferState) -> None:
    if not future.done():
        future.set_result(state)


def _loop_time(deadline: float | None) -> float | None:
    """``time.monotonic()`` deadline → the event loop's clock (they may differ)."""
    if deadline is None:
        return None
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())
