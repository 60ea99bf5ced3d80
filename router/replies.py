"""The reply, as the client receives it: token deltas in, text chunks out.

:func:`reply_chunks` consumes a request's :class:`~router.stream.WorkerDelta` stream and
yields :class:`~router.api.Chunk` objects: incrementally detokenized text (never a broken
character), stop strings applied (the text stops before the match and the worker call is
closed), the route on the first chunk, finish reason and usage on the last. It also
records the client-visible latencies: TTFT on the first chunk, ITL per token after it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence

from common.generation import FinishReason, Usage
from common.logprobs import TokenLogprob
from router.api import Chunk, RouteInfo
from router.detokenizer import IncrementalDetokenizer
from router.disagg_policy import LOCAL, REMOTE
from router.metrics import PoolMetrics
from router.request import PreparedRequest
from router.stop_strings import StopMatcher
from router.stream import WorkerDelta


async def reply_chunks(
    deltas: AsyncGenerator[WorkerDelta, None],
    prepared: PreparedRequest,
    decode: Callable[[Sequence[int]], str],
    metrics: PoolMetrics,
    semantic_route: str,
    start: float,
) -> AsyncIterator[Chunk]:
    """Chunks of the reply; closes ``deltas`` (cancelling the worker call) when done."""
    detok = IncrementalDetokenizer(decode)
    stops = StopMatcher(prepared.stop)
    cached = 0
    first = True
    last_time = start
    try:
        async for delta in deltas:
            now = time.monotonic()
            if first:
                metrics.ttft.observe(now - start)
            elif delta.token_ids:
                gap = (now - last_time) / len(delta.token_ids)
                for _ in delta.token_ids:
                    metrics.itl.observe(gap)
            last_time = now
            if delta.usage is not None:
                cached = delta.usage.cached_tokens
            text = stops.push(detok.push(delta.token_ids))
            finish = delta.finish_reason
            if finish is not None and not stops.stopped:
                text += stops.push(detok.flush())
                text += stops.flush()
            if stops.stopped:
                finish = FinishReason.STOP
            usage = None
            if finish is not None:
                completion = detok.num_tokens
                if delta.usage is not None and not stops.stopped:
                    completion = delta.usage.completion_tokens
                usage = Usage(len(prepared.token_ids), completion, cached)
                metrics.cached_tokens.inc(cached)
            route = _route(delta, semantic_route) if first else None
            # A migrated stream's later attempt re-prefills prompt + sent tokens: only the
            # first attempt's prompt log-probs are the prompt's.
            prompt_logprobs = delta.prompt_logprobs if first else None
            yield Chunk(
                prepared.request_id,
                text,
                delta.token_ids,
                finish,
                usage,
                route,
                delta.logprobs,
                prompt_logprobs,
                _token_texts(delta.logprobs, decode),
            )
            first = False
            if finish is not None:
                return
    finally:
        await deltas.aclose()


def _token_texts(
    logprobs: Sequence[TokenLogprob] | None, decode: Callable[[Sequence[int]], str]
) -> dict[int, str] | None:
    """Each token's own text (one id decoded alone), for OpenAI-shaped log-probs."""
    if not logprobs:
        return None
    ids = {lp.token_id for lp in logprobs} | {t for lp in logprobs for t, _ in lp.top}
    return {token_id: decode([token_id]) for token_id in sorted(ids)}


def _route(delta: WorkerDelta, semantic_route: str) -> RouteInfo:
    d = delta.decision
    prefill = d.prefill_worker_id or ""
    if delta.prefilled_by:  # what actually happened (the decode worker may fall back)
        prefill = "" if delta.prefilled_by == "local" else delta.prefilled_by
    return RouteInfo(
        pool=d.pool,
        prefill_worker=prefill,
        decode_worker=d.decode.worker_id,
        semantic_route=semantic_route,
        policy=d.policy,
        predicted_cached_tokens=d.predicted_cached_tokens,
        attempts=delta.attempts,
        prefill_mode=REMOTE if prefill else LOCAL,
    )
