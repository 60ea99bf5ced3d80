"""Part 1 of the router-overhead benchmark: a routing decision at fleet size.

In process, no servers. Per fleet (prefill + decode workers with random load reports, some
with requests of this router in flight), a prefix index filled through ``BlockStored``
events to its target size (chains of 64 blocks, each held by one prefill and one decode
worker, plus an 8-block system prompt that every prefill worker holds), capped at that
size, and 1024-token queries: a quarter start with the shared system prompt, a quarter
share a random-length prefix with an indexed chain, half are new. Timed per query, on
hash chains (the hashing itself is timed apart, on real tokens):

- ``decision`` = prefix match + policy (prefill and decode pick), the span the router's
  ``routing_decision_seconds`` metric measures;
- ``+ predict`` adds the predictive index insert the router does after deciding (with the
  index at its cap, that includes evicting least recently used blocks);
- ``hashing``: the prompt's block-hash chain, computed once per request before routing.

Also per fleet: the index's entries and memory (its own estimate, and the process's RSS
growth while filling it) and, with a real redis-server, the registry refresh (read every
registration and load, build the snapshot and its load order; wall time and this
process's CPU time) — which runs on its own schedule, so its cost is per refresh, not per
request.
Goal: decision p99 <= 200 µs at 1,000 + 1,000 workers and 10M blocks, per round of
consecutive queries, median round.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

from benchmarks._common import round_stats

BLOCK_SIZE = 16
ROUNDS = 5  # results are medians over rounds: the machine is shared, load comes in bursts
PROMPT_TOKENS = 1024
CHAIN_BLOCKS = PROMPT_TOKENS // BLOCK_SIZE
SYSTEM_BLOCKS = 8
DECISION_GOAL_US = 200.0
REFRESHES = 20


def bench_decisions(queries: int, num_prefill: int, num_decode: int, entries: int) -> dict:
    """One fleet's decision latency, index size and memory."""
    from common.hashing import block_hashes
    from router.candidates import load_order
    from router.policies import PrefixAware, RouteQuery
    from router.routing import decide
    from router.snapshot import PoolSnapshot

    rng = random.Random(0)
    prefill = tuple(_view(i, "prefill", rng) for i in range(num_prefill))
    decode = tuple(_view(i, "decode", rng) for i in range(num_decode))
    order = load_order(prefill, decode, (), 1)
    snapshot = PoolSnapshot("p", prefill, decode, order=order)
    pending = _pending(prefill, decode, rng)

    index, documents, system, fill = _filled_index(prefill, decode, entries, rng)

    def query_chain() -> list[int]:
        fresh = [rng.getrandbits(64) for _ in range(CHAIN_BLOCKS)]
        kind = rng.random()
        if kind < 0.25:
            return system + fresh[SYSTEM_BLOCKS:]
        if kind < 0.5:
            shared = rng.randrange(1, CHAIN_BLOCKS)
            return rng.choice(documents)[:shared] + fresh[shared:]
        return fresh

    policy = PrefixAware()
    decision_us: list[float] = []
    with_predict_us: list[float] = []
    hits = 0
    evicted_before = index.evicted
    for _ in range(queries - queries % ROUNDS):
        hashes = query_chain()
        t1 = time.perf_counter_ns()
        query = RouteQuery(PROMPT_TOKENS, 64, BLOCK_SIZE, index.match(hashes))
        decision = decide(snapshot, policy, query, pending)
        t2 = time.perf_counter_ns()
        assert decision.prefill is not None
        index.predict(decision.prefill.worker_id, hashes)
        index.predict(decision.decode.worker_id, hashes)
        t3 = time.perf_counter_ns()
        hits += decision.predicted_cached_tokens > 0
        decision_us.append((t2 - t1) / 1e3)
        with_predict_us.append((t3 - t1) / 1e3)
    hashing_us = _hashing_us(block_hashes, rng, max(ROUNDS, min(2000, queries // 10)))
    decisions = round_stats(decision_us, ROUNDS)
    return {
        "workers": {"prefill": num_prefill, "decode": num_decode},
        "indexed_entries": index.num_entries,
        "indexed_blocks": index.num_blocks,
        "max_indexed_blocks": index.max_entries,
        "index_mb": index.approx_bytes / 2**20,
        "rss_growth_mb": fill["rss_growth_mb"],
        "fill_s": fill["seconds"],
        "evicted_while_timing": index.evicted - evicted_before,
        "prompt_tokens": PROMPT_TOKENS,
        "queries": len(decision_us),
        "queries_with_prefix_hit": hits,
        "rounds": ROUNDS,
        "decision_us": decisions,
        "decision_plus_predict_us": round_stats(with_predict_us, ROUNDS),
        "hashing_us": round_stats(hashing_us, ROUNDS),
        "goal_p99_us": DECISION_GOAL_US,
        "pass": decisions["p99"] <= DECISION_GOAL_US,
    }


def bench_refresh(num_prefill: int, num_decode: int, refreshes: int = REFRESHES) -> dict:
    """Registry refresh against a real redis-server holding this many registrations."""
    return asyncio.run(_bench_refresh(num_prefill, num_decode, refreshes))


# ---- fixtures ----------------------------------------------------------------------------------


def _view(i: int, role: str, rng: random.Random) -> Any:
    from router.snapshot import WorkerView

    info, load = _worker(i, role, rng)
    return WorkerView(info, load)


def _worker(i: int, role: str, rng: random.Random) -> tuple[Any, Any]:
    from capacity.measure_router import synthetic_worker

    address = f"10.0.{i // 250}.{i % 250}:50100"
    return synthetic_worker(i, role, BLOCK_SIZE, rng, address)


def _pending(prefill: tuple[Any, ...], decode: tuple[Any, ...], rng: random.Random) -> dict:
    """This router's bookkeeping: every worker routed to before; a few prefills in flight
    (5% of prefill workers), open streams on half the decode workers (within their report)."""
    from router.snapshot import Pending

    pending = {w.worker_id: Pending(routed=rng.randrange(100)) for w in prefill + decode}
    for w in prefill:
        if rng.random() < 0.05:
            pending[w.worker_id] = Pending(prefill_tokens=rng.randrange(256, 4096), routed=7)
    for w in decode:
        if rng.random() < 0.5:
            streams = rng.randrange(w.load.running + 2)
            pending[w.worker_id] = Pending(requests=streams, routed=9)
    return pending


def _filled_index(
    prefill: tuple[Any, ...], decode: tuple[Any, ...], entries: int, rng: random.Random
) -> tuple[Any, list[list[int]], list[int], dict[str, float]]:
    """An index capped at ``entries`` and filled to it through BlockStored events."""
    from common.hashing import ROOT_HASH
    from common.kv_events import BlockStored
    from router.index import PrefixIndex

    rss_before = _rss_mb()
    started = time.perf_counter()
    index = PrefixIndex(max_entries=entries)  # predictions live the default 10 s
    system = [rng.getrandbits(64) for _ in range(SYSTEM_BLOCKS)]
    for w in prefill:
        _store(index, w.worker_id, system, ROOT_HASH, BlockStored)
    documents: list[list[int]] = []
    per_document = 2 * CHAIN_BLOCKS
    while index.num_entries + per_document <= entries:
        chain = [rng.getrandbits(64) for _ in range(CHAIN_BLOCKS)]
        documents.append(chain)
        n = len(documents)
        for holder in (prefill[n % len(prefill)], decode[(n * 7) % len(decode)]):
            _store(index, holder.worker_id, chain, ROOT_HASH, BlockStored)
    fill = {"seconds": time.perf_counter() - started, "rss_growth_mb": _rss_mb() - rss_before}
    return index, documents, system, fill


def _store(index: Any, worker_id: str, chain: list[int], parent: int, stored: Any) -> None:
    for i, block_hash in enumerate(chain):
        index.apply(worker_id, stored(block_hash=block_hash, parent_hash=parent, block_id=i))
        parent = block_hash


def _hashing_us(block_hashes: Any, rng: random.Random, n: int) -> list[float]:
    times = []
    for _ in range(n - n % ROUNDS):
        tokens = [rng.randrange(49152) for _ in range(PROMPT_TOKENS)]
        t0 = time.perf_counter_ns()
        block_hashes(tokens, BLOCK_SIZE)
        times.append((time.perf_counter_ns() - t0) / 1e3)
    return times


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def _bench_refresh(num_prefill: int, num_decode: int, refreshes: int) -> dict:
    from common.redis_process import RedisProcess
    from common.registry import Registry
    from router.registry_view import RegistryView

    rng = random.Random(1)
    with RedisProcess() as redis_server:
        registry = Registry(redis_server.url, "bench-refresh", heartbeat_ttl_s=600)
        try:
            workers = [_worker(i, "prefill", rng) for i in range(num_prefill)]
            workers += [_worker(i, "decode", rng) for i in range(num_decode)]
            for info, load in workers:
                await registry.register(info, clear_kv=False)
                await registry.publish_load(load)
            view = RegistryView(registry, ["p"])
            times_ms, cpu_ms = [], []
            for _ in range(refreshes):
                t0, c0 = time.perf_counter(), time.process_time()
                await view.refresh()
                times_ms.append((time.perf_counter() - t0) * 1e3)
                cpu_ms.append((time.process_time() - c0) * 1e3)
            snap = view.snapshot("p")
            assert len(snap.prefill) == num_prefill and len(snap.decode) == num_decode
        finally:
            await registry.aclose()
    times_ms.sort()
    cpu_ms.sort()
    return {
        "workers": num_prefill + num_decode,
        "refreshes": refreshes,
        "p50_ms": times_ms[len(times_ms) // 2],
        "max_ms": times_ms[-1],
        "cpu_p50_ms": cpu_ms[len(cpu_ms) // 2],  # the router's own CPU (Redis excluded)
    }
