"""Request migration: resuming a stream on another decode worker after the first token.

When a decode worker dies (kill, crash, connection reset) or is cut off at the end of its
drain grace while it streams a reply (status UNAVAILABLE or CANCELLED, or a stream that ends
without a finish reason), :class:`~router.stream.DecodeStreamer` resumes the
reply elsewhere instead of failing it. What a resumed attempt sends, and how its deltas are
told to the client, is decided here; the streamer only sequences the attempts::

    attempt 1   prompt P, max_tokens M              → tokens t1..tk sent, then the stream breaks
    attempt 2   prompt P + t1..tk, max_tokens M - k  → the prefill recomputes t1..tk (prefix
                cache), the stream continues with t(k+1)...

The client sees one stream: the router's detokenizer and stop-string matcher never notice the
switch (they live in :mod:`router.replies`, above the streamer); usage counts the original
prompt, every generated token once, and the first attempt's cached tokens.

A break right at the end of a reply is not resumed: the worker sends the last token and
the finish reason in one message, so either both arrived (the stream is over, and the
streamer never reads past the finish) or neither did (the resumed attempt regenerates that
token). When the tokens already sent end the reply by themselves — ``max_tokens`` spent,
or the last one is a stop token id — but the finish was lost, :func:`finished_by` names
the finish and the router ends the stream itself: no extra token, one finish.

What holds: greedy output equals an uninterrupted run in fp32 (in bf16 greedy tokens depend
on the batch and on decode vs recompute, so two runs may part ways). A seeded sampled stream
keeps its seed, but the worker's generator restarts at the resumed position, so the
continuation is a valid sample from the same distribution, not the bytes an uninterrupted
run would have produced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.generation import FinishReason, Usage
from router.request import PreparedRequest

# Causes (the ``cause`` label of ``router_migrations_total``):
WORKER_DIED = "worker_died"  # UNAVAILABLE / CANCELLED from a worker still registered: killed,
#                              crashed, connection reset, engine stopped
DRAINED = "drained"  # the same from a worker that was draining or had deregistered: a drain
#                      that outlasted its grace cut the stream
STREAM_BROKEN = "stream_broken"  # the stream ended without a finish reason (UNKNOWN)
_LOST = frozenset({"UNAVAILABLE", "CANCELLED"})  # the worker (or the connection) went away


def migration_cause(code: str, draining: bool) -> str | None:
    """Why a stream broke with gRPC status ``code`` (a name) on a worker that is
    ``draining`` (or gone from the registry) or not; None when a failure with that status
    must not migrate (the worker rejected the request itself, or failed on it)."""
    if code in _LOST:
        return DRAINED if draining else WORKER_DIED
    return STREAM_BROKEN if code == "UNKNOWN" else None


def finished_by(request: PreparedRequest, sent: Sequence[int]) -> FinishReason | None:
    """How the reply already ended if the tokens ``sent`` complete it (LENGTH when
    ``max_tokens`` is spent, STOP when the last one is a stop token id); None when
    there is more to generate. The model's own EOS token always comes with its finish
    reason in the same message, so a stream that broke after it never reaches here."""
    if len(sent) >= request.sampling.max_tokens:
        return FinishReason.LENGTH
    if sent and sent[-1] in request.sampling.stop_token_ids:
        return FinishReason.STOP
    return None


def resume_request(request: PreparedRequest, sent: Sequence[int]) -> PreparedRequest:
    """``request`` continued after the tokens already ``sent``: those join the prompt and
    ``max_tokens`` shrinks by as many; the stop token ids, ``ignore_eos`` and the seed stay.
    ValueError if nothing is left to generate. The prompt's log-probs went out with the
    first chunk, so the continuation does not ask for them again (``logprobs`` stays)."""
    left = request.sampling.max_tokens - len(sent)
    if left < 1:
        raise ValueError(f"{len(sent)} tokens sent: max_tokens {request.sampling.max_tokens} spent")
    sampling = dataclasses.replace(request.sampling, max_tokens=left, prompt_logprobs=False)
    return dataclasses.replace(request, token_ids=(*request.token_ids, *sent), sampling=sampling)


@dataclass(slots=True)
class Progress:
    """One client stream across its attempts: what it has been sent and how often it moved."""

    prompt_tokens: int  # the original prompt's length
    sent: list[int] = field(default_factory=list)  # token ids the client has been sent
    migrations: int = 0  # resumed attempts so far
    resumed_from: int = 0  # tokens sent before the current attempt began
    cached_tokens: int | None = None  # the first attempt's report (later ones recompute)
    failed_at: float | None = None  # monotonic time of the last break, until the next token
    failed_workers: set[str] = field(default_factory=set)  # decode workers that broke it

    def usage(self, reported: Usage | None) -> Usage | None:
        """The client-facing usage for a delta whose worker reported ``reported``.

        The first attempt's report is the client's. A resumed attempt's worker counts the
        tokens sent before as prompt and only its own as completion, and its cache hits
        include them; so the prompt is the original one, completion adds what was sent
        before this attempt, and the cached tokens stay the first attempt's."""
        if reported is None:
            return None
        if self.migrations == 0:
            if self.cached_tokens is None:
                self.cached_tokens = reported.cached_tokens
            return reported
        completion = self.resumed_from + reported.completion_tokens
        return Usage(self.prompt_tokens, completion, self.cached_tokens or 0)

    def resume(self, worker_id: str, now: float) -> None:
        """Record a break on ``worker_id``; the next attempt resumes after ``sent``."""
        self.migrations += 1
        self.resumed_from = len(self.sent)
        self.failed_workers.add(worker_id)
        if self.failed_at is None:  # a resumed attempt that broke too: still the same gap
            self.failed_at = now
