"""Streams one request's tokens from a decode worker, retrying before the first token.

Lifecycle of a request here (one or more *attempts*)::

    plan(avoid, refused) → Decision          routing (the caller's closure)
      → tracker ticket opened                the router's in-flight bookkeeping
      → DecodeWorker.Decode(stream)          deadline = the client's remaining time
      → first token: committed               from here on, no retry (migration instead)
      → last message (finish_reason) → done  ticket closed, however it ends

Failure policy, before the first token:

- INVALID_ARGUMENT from the worker → the client's fault, returned as is;
- RESOURCE_EXHAUSTED (the worker refuses: its admission queue is full, or the prompt can
  never fit) → try another decode worker; when every one has refused, RESOURCE_EXHAUSTED
  with the soonest of their ``retry-after-ms`` hints;
- anything else (worker died, prefill failed, internal error) → retried *once* on other
  workers where there are any; the second failure → UNAVAILABLE.

After the first token the request is *committed*: a stream that breaks because its decode
worker died or was cut off at the end of its drain (UNAVAILABLE, CANCELLED by the server, or
no finish reason) is *migrated* — resumed on another decode worker from the prompt plus the
tokens already sent (:mod:`router.migration`), up to ``max_migrations`` times per request.
Past the limit, when no other decode worker is live, or on any other failure after the first
token, the stream ends with UNAVAILABLE naming the worker and the number of tokens already
sent. The client's deadline passing is DEADLINE_EXCEEDED; the client cancelling cancels the
worker call (which frees its blocks) and the ticket. After a failure the workers involved
are probed in the background; one that is not SERVING is quarantined so the next requests
avoid it until its registration expires.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

import grpc

from common.errors import ErrorCode, RequestError
from common.generation import FinishReason, Usage
from common.logprobs import TokenLogprob
from common.sampling import SamplingParams
from messages.decode import DecodeJob, PrefillTarget
from messages.decode_proto import delta_from_proto, job_to_proto
from messages.grpc_status import retry_after_ms
from proto import worker_pb2
from router.channels import ChannelPool
from router.migration import Progress, finished_by, migration_cause, resume_request
from router.request import PreparedRequest
from router.routing import Decision
from router.tracker import WorkerTracker

log = logging.getLogger(__name__)

_ROUTER_ID = uuid.uuid4().hex[:6]  # this process, in worker-side request ids
_ATTEMPTS = itertools.count()

Plan = Callable[[frozenset[str], frozenset[str]], Decision]  # (avoid, refused) → decision


@dataclass(frozen=True, slots=True)
class WorkerDelta:
    """One DecodeResponse, with the attempt that produced it."""

    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None  # set on the last delta
    usage: Usage | None  # last delta (or any delta that carries it)
    decision: Decision
    attempts: int
    prefilled_by: str  # first delta: the prefill worker id, "local", or "" if unknown
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token, when asked
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # an attempt's first delta


class _StreamBroken(Exception):
    """The worker's stream ended without a finish reason."""


class DecodeStreamer:
    def __init__(
        self,
        channels: ChannelPool,
        tracker: WorkerTracker,
        max_retries: int = 1,
        on_retry: Callable[[str, str], None] | None = None,
        max_migrations: int = 0,
        on_migration: Callable[[str, str], None] | None = None,
        on_migrated: Callable[[str, float], None] | None = None,
        draining: Callable[[str, str], bool] | None = None,
    ) -> None:
        self._channels = channels
        self._tracker = tracker
        self._max_retries = max_retries
        self._on_retry = on_retry or (lambda pool, reason: None)  # (pool, reason)
        self._max_migrations = max_migrations
        self._on_migration = on_migration or (lambda pool, cause: None)  # (pool, cause)
        # (pool, seconds from the break to the resumed attempt's first token)
        self._on_migrated = on_migrated or (lambda pool, seconds: None)
        # (pool, worker id) → whether the registry shows it draining or gone (a drain cut)
        self._draining = draining or (lambda pool, worker_id: False)
        self._probes: set[asyncio.Task[None]] = set()

    async def stream(
        self, request: PreparedRequest, plan: Plan, deadline: float | None
    ) -> AsyncGenerator[WorkerDelta, None]:
        """Yield the request's deltas; raises RequestError with the public status."""
        avoid: set[str] = set()
        refused: set[str] = set()
        failures = attempts = 0
        progress = Progress(len(request.token_ids))
        current = request  # what this attempt sends: the request, or its resumption
        hints: list[int] = []  # retry-after hints of the workers that refused it
        while True:
            try:
                decision = self._decide(plan, avoid, refused, progress)
            except RequestError as exc:
                if exc.code is ErrorCode.RESOURCE_EXHAUSTED and hints:
                    exc.retry_after_ms = min(hints)  # the soonest a refusing worker has room
                raise
            attempts += 1
            decode_id = decision.decode.worker_id
            ticket = self._tracker.open(
                decision.prefill_worker_id, decode_id, len(current.token_ids)
            )
            call: grpc.aio.UnaryStreamCall | None = None
            tokens = 0
            try:
                call = self._channels.decode_stub(decision.decode.info.grpc_address).Decode(
                    _decode_request(current, decision),
                    timeout=_remaining(deadline),
                    metadata=self._channels.metadata,
                )
                async for response in call:
                    delta = _delta(response, decision, attempts, progress, current.sampling)
                    if tokens == 0 and delta.token_ids:
                        self._tracker.first_token(ticket)
                        if progress.failed_at is not None:
                            self._on_migrated(decision.pool, time.monotonic() - progress.failed_at)
                            progress.failed_at = None
                    tokens += len(delta.token_ids)
                    progress.sent.extend(delta.token_ids)
                    yield delta
                    if delta.finish_reason is not None:
                        return
                raise _StreamBroken("the worker's stream ended without a finish reason")
            except (grpc.aio.AioRpcError, _StreamBroken) as exc:
                code, details = _describe(exc)
                if deadline is not None and time.monotonic() >= deadline:
                    raise RequestError(ErrorCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
                if progress.sent:
                    self._probe(decision)
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED.name and tokens == 0:
                        refused.add(decode_id)  # a resumed attempt refused: try another
                        continue
                    finished = finished_by(request, progress.sent)
                    if finished is not None:
                        # The reply is complete, only the finish reason was lost: finish
                        # here (no migration, whatever the limit: nothing is left to send).
                        cached = progress.cached_tokens or 0
                        usage = Usage(progress.prompt_tokens, len(progress.sent), cached)
                        yield WorkerDelta((), finished, usage, decision, attempts, "")
                        return
                    error = self._migrate(request, progress, decision, code, details)
                    if error is not None:
                        raise error from None
                    avoid.add(decode_id)
                    if tokens == 0 and decision.prefill_worker_id:
                        avoid.add(decision.prefill_worker_id)  # either may have failed
                    current = resume_request(request, progress.sent)
                    continue
                if code == grpc.StatusCode.INVALID_ARGUMENT.name:
                    raise RequestError(ErrorCode.INVALID_ARGUMENT, details) from None
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED.name:
                    log.info("%s: %s refused: %s", request.request_id, decode_id, details)
                    hint = retry_after_ms(exc) if isinstance(exc, grpc.aio.AioRpcError) else None
                    if hint is not None:
                        hints.append(hint)
                    refused.add(decode_id)
                    self._on_retry(decision.pool, "refused")
                    continue
                failures += 1
                self._probe(decision)
                workers = ", ".join(w for w in (decision.prefill_worker_id, decode_id) if w)
                if failures > self._max_retries:
                    raise RequestError(
                        ErrorCode.UNAVAILABLE,
                        f"request failed before its first token on {failures} attempts; "
                        f"last on {workers}: {code}: {details}",
                    ) from None
                log.warning(
                    "%s: attempt %d on %s failed before the first token (%s: %s); retrying",
                    request.request_id,
                    attempts,
                    workers,
                    code,
                    details,
                )
                avoid.update(w for w in (decision.prefill_worker_id, decode_id) if w)
                self._on_retry(decision.pool, "failed")
            finally:
                if call is not None:
                    call.cancel()  # no-op once finished; frees the worker's blocks otherwise
                self._tracker.close(ticket)

    def _decide(
        self, plan: Plan, avoid: set[str], refused: set[str], progress: Progress
    ) -> Decision:
        """The next attempt's workers. A resumed stream never goes back to a decode worker
        that broke it, and a routing error there is UNAVAILABLE: the client has tokens."""
        if not progress.sent:
            return plan(frozenset(avoid), frozenset(refused))
        try:
            decision = plan(frozenset(avoid), frozenset(refused))
        except RequestError as exc:
            raise _unmigratable(progress, exc.message) from None
        if decision.decode.worker_id in progress.failed_workers:
            raise _unmigratable(progress, "no other live decode worker to resume it on")
        return decision

    def _migrate(
        self,
        request: PreparedRequest,
        progress: Progress,
        decision: Decision,
        code: str,
        details: str,
    ) -> RequestError | None:
        """Record a migration of ``request`` off ``decision``'s decode worker; or, when it
        cannot move, the UNAVAILABLE that ends the stream."""
        decode_id = decision.decode.worker_id
        broke = (
            f"decode worker {decode_id} failed after {len(progress.sent)} tokens were sent "
            f"({code}: {details}); the reply is incomplete"
        )
        cause = migration_cause(code, self._draining(decision.pool, decode_id))
        if cause is None:
            return RequestError(ErrorCode.UNAVAILABLE, broke)
        if progress.migrations >= self._max_migrations:
            if self._max_migrations:
                broke += (
                    f"; migration limit reached: it already moved {progress.migrations} "
                    f"time(s) (max_migrations {self._max_migrations})"
                )
            return RequestError(ErrorCode.UNAVAILABLE, broke)
        progress.resume(decode_id, time.monotonic())
        self._on_migration(decision.pool, cause)
        log.warning(
            "%s: decode worker %s broke the stream after %d tokens (%s, %s: %s); "
            "migrating (%d of at most %d)",
            request.request_id,
            decode_id,
            len(progress.sent),
            cause,
            code,
            details,
            progress.migrations,
            self._max_migrations,
        )
        return None

    async def close(self) -> None:
        for task in list(self._probes):
            task.cancel()

    def _probe(self, decision: Decision) -> None:
        """Quarantine, in the background, the workers of ``decision`` that look dead."""
        for worker in (decision.prefill, decision.decode):
            if worker is None:
                continue
            task = asyncio.create_task(self._probe_one(worker.worker_id, worker.info.grpc_address))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)

    async def _probe_one(self, worker_id: str, address: str) -> None:
        if not await self._channels.probe(address, timeout_s=1.0):
            log.warning("worker %s (%s) is not serving: quarantined", worker_id, address)
            self._tracker.quarantine(worker_id)


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise RequestError(ErrorCode.DEADLINE_EXCEEDED, "deadline exceeded")
    return remaining


def _decode_request(request: PreparedRequest, decision: Decision) -> worker_pb2.DecodeRequest:
    # Unique per attempt: a retry may reach a worker that still holds the failed attempt,
    # and two clients may send the same request id.
    worker_request_id = f"{request.request_id}.{_ROUTER_ID}{next(_ATTEMPTS)}"
    prefill = None
    if decision.prefill is not None:
        prefill = PrefillTarget(decision.prefill.worker_id, decision.prefill.info.grpc_address)
    job = DecodeJob(
        worker_request_id,
        request.token_ids,
        request.sampling,
        prefill,
        priority=request.priority,
        client_id=request.client_id,
    )
    return job_to_proto(job)


def _delta(
    response: worker_pb2.DecodeResponse,
    decision: Decision,
    attempts: int,
    progress: Progress,
    params: SamplingParams | None = None,
) -> WorkerDelta:
    delta = delta_from_proto(response, params)
    return WorkerDelta(
        token_ids=delta.token_ids,
        finish_reason=delta.finish_reason,
        usage=progress.usage(delta.usage),
        decision=decision,
        attempts=attempts,
        prefilled_by=delta.prefilled_by,
        logprobs=delta.logprobs,
        prompt_logprobs=delta.prompt_logprobs,
    )


def _unmigratable(progress: Progress, reason: str) -> RequestError:
    failed = ", ".join(sorted(progress.failed_workers))
    return RequestError(
        ErrorCode.UNAVAILABLE,
        f"decode worker {failed} failed after {len(progress.sent)} tokens were sent and the "
        f"stream could not be migrated: {reason}; the reply is incomplete",
    )


def _describe(exc: Exception) -> tuple[str, str]:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name, exc.details() or ""
    return grpc.StatusCode.UNKNOWN.name, str(exc)
