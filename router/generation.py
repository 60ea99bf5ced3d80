"""The router's request path, proto-free: admit, route, stream text.

Lifecycle of one request (:meth:`Generator.generate`)::

    admit     check the input; resolve ``model`` to candidate pools (NOT_FOUND);
              semantic route among them, else the default pool; tokenize with that
              pool's tokenizer; check lengths against its context; hash the blocks
    queue     the pool's admission queue (router.admission): wait for one of its
              ``max_in_flight`` slots by priority and caller, or RESOURCE_EXHAUSTED at once
              with a retry-after hint; held until the stream ends. A request with no
              deadline gets ``default_deadline_s`` (DEADLINE_EXCEEDED when it passes)
    route     per attempt: prefix match in the pool's index → policy → Decision;
              predict the prompt's blocks on the chosen worker; debug-log the scores
    stream    DecodeStreamer yields token deltas (retrying before the first token);
              router.replies turns them into text Chunks

Every outcome lands in ``requests_total{status}``; errors are
:class:`~common.errors.RequestError` with the public status, which the servicer turns into
a gRPC status.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from common.admission_gate import Refused
from common.errors import ErrorCode, RequestError
from common.hashing import block_hashes
from router.admission import TOO_LARGE, WORKERS_FULL, RouterAdmission
from router.api import Chunk, GenerateInput, ModelCard
from router.config import PoolConfig, RouterConfig
from router.index import PrefixIndex
from router.metrics import PoolMetrics, RouterMetrics
from router.policies import RouteQuery, RoutingPolicy
from router.registry_view import RegistryView
from router.replies import reply_chunks
from router.request import PreparedRequest, check_input, finalize, tokenize
from router.routing import Decision, decide
from router.semantic import SemanticMatch, SemanticRouter
from router.stream import DecodeStreamer, Plan
from router.tokenizer import ModelTokenizer
from router.tracker import WorkerTracker

log = logging.getLogger(__name__)

_TOKENIZE_INLINE_CHARS = 4096  # longer texts are tokenized off the event loop


@dataclass(frozen=True, slots=True)
class PoolRuntime:
    """What the router holds per pool: its config, tokenizer, prefix index and policy."""

    config: PoolConfig
    tokenizer: ModelTokenizer
    index: PrefixIndex
    policy: RoutingPolicy

    @property
    def context_len(self) -> int:
        native = self.tokenizer.facts.context_len
        cap = self.config.max_model_len
        return min(native, cap) if cap else native


class Generator:
    def __init__(
        self,
        config: RouterConfig,
        pools: Mapping[str, PoolRuntime],
        view: RegistryView,
        tracker: WorkerTracker,
        streamer: DecodeStreamer,
        metrics: RouterMetrics,
        semantic: SemanticRouter | None = None,
    ) -> None:
        self._config = config
        self._pools = pools
        self._view = view
        self._tracker = tracker
        self._streamer = streamer
        self._metrics = metrics
        self._semantic = semantic
        self._admission = RouterAdmission(config.pools, metrics)

    @property
    def admission(self) -> RouterAdmission:
        """The per-pool admission queues (read-only use: depths, for tests and status)."""
        return self._admission

    def list_models(self) -> list[ModelCard]:
        cards = []
        for name, rt in self._pools.items():
            snap = self._view.snapshot(name)
            decoders = len(snap.decode) + len(snap.colocated)
            cards.append(
                ModelCard(
                    rt.config.model,
                    name,
                    rt.context_len,
                    len(snap.prefill),
                    decoders,
                    name == self._config.default_pool,
                )
            )
        return cards

    async def generate(self, req: GenerateInput, timeout_s: float | None) -> AsyncIterator[Chunk]:
        """The reply's chunks; raises RequestError (and CancelledError if the client left)."""
        start = time.monotonic()
        if timeout_s is None:
            timeout_s = self._config.default_deadline_s
        deadline = start + timeout_s if timeout_s is not None else None
        pool, route = "", ""
        status = "OK"
        self._metrics.in_flight.inc()
        try:
            request_id = check_input(req, self._config.limits)
            match = await self._semantic_match(req)
            pool = self._pool_for(req.model, match)
            route = match.route if match else ""
            prepared, hashes = await self._admit(req, request_id, self._pools[pool])
            rt = self._pools[pool]
            async with self._admission.admitted(pool, req.priority, req.client_id, deadline):
                deltas = self._streamer.stream(prepared, self._plan(prepared, hashes, rt), deadline)
                replies = reply_chunks(
                    deltas, prepared, rt.tokenizer.decode, self._pool_metrics(pool), route, start
                )
                async with contextlib.aclosing(replies):
                    async for chunk in replies:
                        yield chunk
        except RequestError as exc:
            status = exc.code.value
            if exc.code is ErrorCode.RESOURCE_EXHAUSTED and not isinstance(exc, Refused):
                self._workers_refused(pool, exc)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = ErrorCode.CANCELLED.value
            raise
        except Exception:
            status = ErrorCode.INTERNAL.value
            log.exception("request failed")
            raise
        finally:
            self._metrics.in_flight.dec()
            self._metrics.requests.labels(pool, route, status).inc()
            if status == "OK":
                self._pool_metrics(pool).e2e.observe(time.monotonic() - start)

    def _workers_refused(self, pool: str, exc: RequestError) -> None:
        """Every worker refused: for now (their queues were full: the refusal carries their
        retry-after hint, router.stream), or for good (the prompt can never fit: no hint)."""
        if pool:
            self._admission.refused(pool, WORKERS_FULL if exc.retry_after_ms else TOO_LARGE)

    def _pool_metrics(self, pool: str) -> PoolMetrics:
        return self._metrics.pool(pool, self._pools[pool].policy.name)

    # ---- admission -------------------------------------------------------------------------

    async def _semantic_match(self, req: GenerateInput) -> SemanticMatch | None:
        text = req.semantic_text
        if self._semantic is None or not text:
            return None
        started = time.perf_counter()
        match = await self._semantic.aclassify(text, self._candidates(req.model))
        self._metrics.semantic.observe(time.perf_counter() - started)
        return match

    def _candidates(self, model: str) -> list[str]:
        """Pools that may serve ``model`` (a pool or model name; "" = any)."""
        if not model:
            return list(self._pools)
        names = [n for n, rt in self._pools.items() if model in (n, rt.config.model)]
        if not names:
            known = sorted({*self._pools, *(rt.config.model for rt in self._pools.values())})
            raise RequestError(
                ErrorCode.NOT_FOUND, f"unknown model {model!r}; known: {', '.join(known)}"
            )
        return names

    def _pool_for(self, model: str, match: SemanticMatch | None) -> str:
        candidates = self._candidates(model)
        if match is not None and match.pool in candidates:
            return match.pool
        default = self._config.default_pool
        return default if default in candidates else candidates[0]

    async def _admit(
        self, req: GenerateInput, request_id: str, rt: PoolRuntime
    ) -> tuple[PreparedRequest, list[int]]:
        size = len(req.prompt or "") + sum(len(m.content) for m in req.messages or ())
        if size > _TOKENIZE_INLINE_CHARS:
            token_ids = await asyncio.to_thread(tokenize, req, rt.tokenizer)
        else:
            token_ids = tokenize(req, rt.tokenizer)
        prepared = finalize(
            request_id,
            token_ids,
            req.sampling,
            rt.context_len,
            rt.tokenizer.facts.vocab_size,
            self._config.limits,
        )
        prepared = dataclasses.replace(prepared, priority=req.priority, client_id=req.client_id)
        block_size = self._view.snapshot(rt.config.name).block_size
        if block_size is None:
            raise RequestError(ErrorCode.UNAVAILABLE, f"pool {rt.config.name!r} has no live worker")
        return prepared, block_hashes(prepared.token_ids, block_size)

    # ---- routing ---------------------------------------------------------------------------

    def _plan(self, prepared: PreparedRequest, hashes: list[int], rt: PoolRuntime) -> Plan:
        name = rt.config.name

        def plan(avoid: frozenset[str], refused: frozenset[str]) -> Decision:
            snapshot = self._view.snapshot(name)
            block_size = snapshot.block_size or 1
            started = time.perf_counter()
            query = RouteQuery(
                len(prepared.token_ids),
                prepared.sampling.max_tokens,
                block_size,
                rt.index.match(hashes),
            )
            decision = decide(
                snapshot,
                rt.policy,
                query,
                self._tracker.pending,
                avoid=avoid,
                refused=refused,
                quarantined=self._tracker.quarantined(),
                conditional=rt.config.conditional,
            )
            elapsed = time.perf_counter() - started
            # Both sides will cache the prompt: the prefill worker computes it, the decode
            # worker lands (or computes) it into its own prefix cache.
            for caching in (decision.prefill, decision.decode):
                if caching is not None:
                    rt.index.predict(caching.worker_id, hashes)
            if decision.prefill_choice is not None:
                self._log_prefill_choice(prepared.request_id, name, decision)
            m = self._pool_metrics(name)
            m.decision.observe(elapsed)
            m.prompt_tokens.inc(query.num_tokens)
            m.predicted_cached.inc(decision.predicted_cached_tokens)
            m.prefix_hit_ratio.observe(decision.predicted_cached_tokens / query.num_tokens)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s: pool=%s policy=%s tokens=%d prefill=%s decode=%s predicted_cached=%d "
                    "prefill_costs=%s decode_costs=%s decided_in=%.1fus",
                    prepared.request_id,
                    name,
                    decision.policy,
                    query.num_tokens,
                    decision.prefill_worker_id,
                    decision.decode.worker_id,
                    decision.predicted_cached_tokens,
                    dict(decision.prefill_scores),
                    dict(decision.decode_scores),
                    elapsed * 1e6,
                )
            return decision

        return plan

    def _log_prefill_choice(self, request_id: str, pool: str, decision: Decision) -> None:
        choice, x = decision.prefill_choice, decision.prefill_inputs
        assert choice is not None and x is not None
        self._metrics.prefill_decisions.labels(pool, choice.mode, choice.reason).inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s: prefill_mode=%s reason=%s tokens=%d uncached local=%d remote=%d "
                "prefill_queue_tokens=%d decode_running=%d",
                request_id,
                choice.mode,
                choice.reason,
                x.num_tokens,
                x.local_uncached,
                x.remote_uncached,
                x.prefill_queue_tokens,
                x.decode_running,
            )
