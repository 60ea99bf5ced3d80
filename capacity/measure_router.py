"""Router decision time and per-request RPC overhead, for a profile. Torch-free.

- Decision: ``router.routing.decide`` with the prefix-aware policy on a snapshot of
  ``workers`` prefill + ``workers`` decode workers with random load reports, a prefix index
  holding chains of blocks on some of them (plus a system prompt every prefill worker
  holds), and 1024-token queries (a quarter with the system prompt, a quarter sharing a
  prefix with an indexed chain, half new). Timed: index match + decide, the span of the
  router's ``routing_decision_seconds`` metric.
- RPC: one unary gRPC call (health ``Check``) round trip on loopback against a real
  ``common.grpc_server.GrpcServer`` (grpc.aio on both sides, as between router and
  workers). The simulator charges it per hop (``overheads["rpc_s"]``).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.worker_info import WorkerInfo, WorkerLoad
    from router.index import PrefixIndex
    from router.snapshot import WorkerView

PROMPT_TOKENS = 1024
CHAIN_BLOCKS = 64
SYSTEM_BLOCKS = 8


@dataclass(frozen=True)
class DecisionTimes:
    median_s: float
    p99_s: float


def synthetic_worker(
    i: int, role: str, block_size: int, rng: random.Random, address: str
) -> tuple[WorkerInfo, WorkerLoad]:
    """Worker ``i`` of ``role`` with a random, plausible load report (for decision
    timings here and in benchmarks/_routing_decisions.py)."""
    from common.worker_info import BlockGeometry, WorkerInfo, WorkerLoad, WorkerRole

    geometry = BlockGeometry("m", "float32", block_size, 30, 3, 64, 4096)
    worker_id = f"{role}-{i:04d}"
    info = WorkerInfo(worker_id, WorkerRole(role), "p", "m", address, None, geometry)
    load = WorkerLoad(
        worker_id,
        queued=rng.randrange(4),
        running=rng.randrange(32),
        free_blocks=rng.randrange(100, 4000),
        used_blocks=rng.randrange(3000),
        cached_blocks=0,
        queued_prefill_tokens=rng.randrange(4000),
    )
    return info, load


def _worker(i: int, role: str, block_size: int, rng: random.Random) -> WorkerView:
    from router.snapshot import WorkerView

    return WorkerView(*synthetic_worker(i, role, block_size, rng, f"127.0.0.1:{50100 + i}"))


def _store(index: PrefixIndex, worker_id: str, chain: list[int]) -> None:
    from common.hashing import ROOT_HASH
    from common.kv_events import BlockStored

    parent = ROOT_HASH
    for i, block_hash in enumerate(chain):
        index.apply(worker_id, BlockStored(block_hash=block_hash, parent_hash=parent, block_id=i))
        parent = block_hash


def decision_times(
    workers: int = 16, queries: int = 2000, chains: int = 200, block_size: int = 16
) -> DecisionTimes:
    """Median and p99 seconds of one routing decision (prefix match + policy)."""
    from router.candidates import load_order
    from router.index import PrefixIndex
    from router.policies import PrefixAware, RouteQuery
    from router.routing import decide
    from router.snapshot import Pending, PoolSnapshot

    rng = random.Random(0)
    prefill = tuple(_worker(i, "prefill", block_size, rng) for i in range(workers))
    decode = tuple(_worker(i, "decode", block_size, rng) for i in range(workers))
    snapshot = PoolSnapshot("p", prefill, decode, order=load_order(prefill, decode, (), 1))
    pending = {w.worker_id: Pending(routed=rng.randrange(100)) for w in prefill + decode}
    index = PrefixIndex()
    system = [rng.getrandbits(64) for _ in range(SYSTEM_BLOCKS)]
    for w in prefill:
        _store(index, w.worker_id, system)
    documents = [[rng.getrandbits(64) for _ in range(CHAIN_BLOCKS)] for _ in range(chains)]
    for n, chain in enumerate(documents):
        _store(index, prefill[n % workers].worker_id, chain)
        _store(index, decode[(n * 7) % workers].worker_id, chain)
    policy = PrefixAware()
    samples = []
    for _ in range(queries):
        fresh = [rng.getrandbits(64) for _ in range(CHAIN_BLOCKS)]
        kind = rng.random()
        if kind < 0.25:
            hashes = system + fresh[SYSTEM_BLOCKS:]
        elif kind < 0.5:
            shared = rng.randrange(1, CHAIN_BLOCKS)
            hashes = rng.choice(documents)[:shared] + fresh[shared:]
        else:
            hashes = fresh
        start = time.perf_counter()
        query = RouteQuery(PROMPT_TOKENS, 64, block_size, index.match(hashes))
        decide(snapshot, policy, query, pending)
        samples.append(time.perf_counter() - start)
    samples.sort()
    return DecisionTimes(statistics.median(samples), samples[int(0.99 * (len(samples) - 1))])


def rpc_round_trip_s(calls: int = 300) -> float:
    """Median seconds of one unary gRPC round trip on loopback (grpc.aio both sides)."""
    return asyncio.run(_rpc_round_trip(calls))


async def _rpc_round_trip(calls: int) -> float:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from common.grpc_server import GrpcServer

    server = GrpcServer("127.0.0.1", 0, [], [])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="")
            for _ in range(20):  # connect and warm up
                await stub.Check(request)
            samples = []
            for _ in range(calls):
                start = time.perf_counter()
                await stub.Check(request)
                samples.append(time.perf_counter() - start)
    finally:
        await server.stop(grace_s=0)
    return statistics.median(samples)
