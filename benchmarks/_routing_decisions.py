"""Part 1 of the router-overhead benchmark: how long a routing decision takes.

In process, no servers: a pool of 16 prefill + 16 decode workers with load reports, a
prefix index holding 100k (worker, block) entries (chains of 1024-token prompts spread
over the prefill workers), and 1024-token queries — half share a random-length prefix
with an indexed chain, half are new. Timed per query: ``decision`` = prefix match + policy
(prefill and decode pick), the span the router's ``routing_decision_seconds`` metric
measures; ``+ predict`` adds the predictive index insert the router does after deciding;
``hashing`` is the prompt's block-hash chain (computed once per request, before routing).
Goal: decision p99 <= 200 µs, per round of consecutive queries, median round.
"""

from __future__ import annotations

import random
import time

from benchmarks._common import round_stats

BLOCK_SIZE = 16
ROUNDS = 5  # results are medians over rounds: the machine is shared, load comes in bursts
PROMPT_TOKENS = 1024
DECISION_GOAL_US = 200.0


def bench_decisions(queries: int, num_prefill: int, num_decode: int, entries: int) -> dict:
    from common.hashing import block_hashes
    from common.worker_info import BlockGeometry, WorkerInfo, WorkerLoad, WorkerRole
    from router.index import PrefixIndex
    from router.policies import PrefixAware, RouteQuery
    from router.routing import decide
    from router.snapshot import Pending, PoolSnapshot, WorkerView

    rng = random.Random(0)
    geometry = BlockGeometry("m", "float32", BLOCK_SIZE, 30, 3, 64, 4096)

    def view(i: int, role: WorkerRole) -> WorkerView:
        worker_id = f"{role.value}-{i:02d}"
        info = WorkerInfo(worker_id, role, "p", "m", f"127.0.0.1:{10000 + i}", None, geometry)
        load = WorkerLoad(
            worker_id,
            queued=rng.randrange(4),
            running=rng.randrange(32),
            free_blocks=rng.randrange(100, 4000),
            used_blocks=rng.randrange(3000),
            cached_blocks=0,
            queued_prefill_tokens=rng.randrange(4000),
        )
        return WorkerView(info, load)

    prefill = tuple(view(i, WorkerRole.PREFILL) for i in range(num_prefill))
    decode = tuple(view(i, WorkerRole.DECODE) for i in range(num_decode))
    snapshot = PoolSnapshot("p", prefill, decode)
    pending = {w.worker_id: Pending(routed=rng.randrange(100)) for w in prefill + decode}

    index = PrefixIndex(prediction_ttl_s=3600)
    documents: list[list[int]] = []
    while index.num_entries < entries:
        tokens = [rng.randrange(49152) for _ in range(PROMPT_TOKENS)]
        documents.append(tokens)
        holder = prefill[len(documents) % num_prefill].worker_id
        index.predict(holder, block_hashes(tokens, BLOCK_SIZE))
    indexed = index.num_entries

    def query_tokens() -> list[int]:
        fresh = [rng.randrange(49152) for _ in range(PROMPT_TOKENS)]
        if rng.random() < 0.5:
            shared = rng.randrange(1, PROMPT_TOKENS)
            return rng.choice(documents)[:shared] + fresh[shared:]
        return fresh

    policy = PrefixAware()
    decision_us: list[float] = []
    with_predict_us: list[float] = []
    hashing_us: list[float] = []
    hits = 0
    for _ in range(queries - queries % ROUNDS):
        tokens = query_tokens()
        t0 = time.perf_counter_ns()
        hashes = block_hashes(tokens, BLOCK_SIZE)
        t1 = time.perf_counter_ns()
        query = RouteQuery(len(tokens), 64, BLOCK_SIZE, index.match(hashes))
        decision = decide(snapshot, policy, query, pending)
        t2 = time.perf_counter_ns()
        assert decision.prefill is not None
        index.predict(decision.prefill.worker_id, hashes)
        t3 = time.perf_counter_ns()
        hits += decision.predicted_cached_tokens > 0
        hashing_us.append((t1 - t0) / 1e3)
        decision_us.append((t2 - t1) / 1e3)
        with_predict_us.append((t3 - t1) / 1e3)
    return {
        "workers": {"prefill": num_prefill, "decode": num_decode},
        "indexed_entries": indexed,
        "prompt_tokens": PROMPT_TOKENS,
        "queries": len(decision_us),
        "queries_with_prefix_hit": hits,
        "rounds": ROUNDS,
        "decision_us": round_stats(decision_us, ROUNDS),
        "decision_plus_predict_us": round_stats(with_predict_us, ROUNDS),
        "hashing_us": round_stats(hashing_us, ROUNDS),
        "goal_p99_us": DECISION_GOAL_US,
        "pass": round_stats(decision_us, ROUNDS)["p99"] <= DECISION_GOAL_US,
    }
