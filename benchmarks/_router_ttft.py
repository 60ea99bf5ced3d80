"""Part 2 of the router-overhead benchmark: the TTFT the router adds.

TTFT through the router vs calling the decode worker directly, on loopback, one request
at a time (2 ms apart), the paths interleaved: a private redis-server, one worker and
``python -m router`` in their own processes; the client (this process) uses blocking
grpcio with warm channels. TTFT = request sent → first message. ``fake`` worker:
:mod:`benchmarks._fake_decode_worker`, which answers at once, so the difference is the
router's own cost (validation, block hashes, routing, one more gRPC hop, detokenization).
Paths: ``direct`` (Decode with token ids), ``router ids`` (Generate with the same token
ids), ``router text`` (Generate with the prompt text: adds tokenization). ``real``: the
same with a real colocated worker running the default model (distinct random 128-token
prompts, so no prefix-cache hits). Goal (fake worker): router ids p50 - direct p50 <= 2 ms
(median over rounds).
"""

from __future__ import annotations

import functools
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._common import round_stats
from benchmarks._routing_decisions import ROUNDS
from common.server_process import RouterProcess, WorkerSpec
from loadgen.stack import LocalCluster
from loadgen.summary import percentile

TTFT_GOAL_MS = 2.0
FAKE_WORKER = "benchmarks._fake_decode_worker"


def bench_ttft(
    worker_address: str, router_address: str, iterations: int, prompts: Callable[[int], Any]
) -> dict:
    """Interleave the three paths ``iterations`` times; TTFT in ms per path."""
    import grpc

    from proto import serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc

    direct = worker_pb2_grpc.DecodeWorkerStub(grpc.insecure_channel(worker_address))
    router = serving_pb2_grpc.GenerationStub(grpc.insecure_channel(router_address))

    def first_message(call: Callable[[], Any]) -> float:
        start = time.perf_counter()
        stream = call()
        next(stream)
        ttft = (time.perf_counter() - start) * 1e3
        for _ in stream:  # drain the rest
            pass
        time.sleep(0.002)
        return ttft

    sampling = worker_pb2.SamplingParams(max_tokens=8, temperature=0.0)
    public = serving_pb2.SamplingParams(max_tokens=8, temperature=0.0)
    paths: dict[str, list[float]] = {"direct": [], "router ids": [], "router text": []}
    for i in range(iterations + 5):  # the first 5 warm up
        text, (direct_ids, router_ids) = prompts(i)
        calls = {
            "direct": functools.partial(
                direct.Decode,
                worker_pb2.DecodeRequest(token_ids=direct_ids, sampling=sampling),
                timeout=60,
            ),
            "router ids": functools.partial(
                router.Generate,
                serving_pb2.GenerateRequest(
                    token_ids=serving_pb2.TokenIds(ids=router_ids), sampling=public
                ),
                timeout=60,
            ),
            "router text": functools.partial(
                router.Generate,
                serving_pb2.GenerateRequest(prompt=text, sampling=public),
                timeout=60,
            ),
        }
        for path, call in calls.items():
            ttft = first_message(call)
            if i >= 5:
                paths[path].append(ttft)
    result: dict[str, Any] = {path: round_stats(values, ROUNDS) for path, values in paths.items()}
    size = len(paths["direct"]) // ROUNDS

    def added(path: str) -> float:
        per_round = [
            percentile(paths[path][i * size : (i + 1) * size], 50)
            - percentile(paths["direct"][i * size : (i + 1) * size], 50)
            for i in range(ROUNDS)
        ]
        return statistics.median(per_round)

    result["added_p50_ms"] = added("router ids")
    result["added_p50_ms_with_tokenization"] = added("router text")
    result["iterations"] = iterations
    return result


def start_router(redis_url: str, namespace: str, log: Path) -> RouterProcess:
    args = ["--redis-url", redis_url, "--namespace", namespace, "--port", "0",
            "--log-level", "WARNING"]  # fmt: skip
    return RouterProcess(args, log).wait_ready()


def run_ttft(log_dir: Path, iterations: int, real: bool, real_iterations: int) -> dict:
    """The fake worker's TTFT paths; with ``real``, a real colocated worker's too."""
    from router.tokenizer import ModelTokenizer

    tokenizer = ModelTokenizer.load(None)
    text = "Summarise the following notes for the weekly report. " * 16
    ids = tokenizer.encode(text)
    results: dict[str, Any] = {}
    with (
        LocalCluster([WorkerSpec(FAKE_WORKER, "fake-0")], log_dir, "bench-fake") as cluster,
        start_router(cluster.redis.url, "bench-fake", log_dir / "router-fake.log") as router,
    ):
        time.sleep(0.5)  # the router's registry view has seen the worker
        results["fake"] = bench_ttft(
            cluster["fake-0"].grpc_address, router.address, iterations, lambda i: (text, (ids, ids))
        )
        results["fake"]["prompt_tokens"] = len(ids)
    if real:
        results["real"] = run_real(log_dir, real_iterations, tokenizer)
    return results


def run_real(log_dir: Path, iterations: int, tokenizer: Any) -> dict:
    spec = WorkerSpec(
        "decode_worker",
        "colocated-0",
        ("--colocated", "--num-threads", "1", "--num-kv-blocks", "512"),
    )
    rng = random.Random(1)
    text_tokens: list[int] = []

    def prompts(i: int) -> tuple[str, tuple[list[int], list[int]]]:
        # Fresh random 128-token prompts per path so nobody hits the prefix cache; the text
        # path gets the text of another random prompt (about as many tokens once encoded).
        direct, routed, other = ([rng.randrange(100, 40000) for _ in range(128)] for _ in range(3))
        text = tokenizer.decode(other)
        text_tokens.append(len(tokenizer.encode(text)))
        return text, (direct, routed)

    with (
        LocalCluster([spec], log_dir, namespace="bench-real") as cluster,
        start_router(cluster.redis.url, "bench-real", log_dir / "router-real.log") as router,
    ):
        time.sleep(0.5)
        result = bench_ttft(
            cluster["colocated-0"].grpc_address, router.address, iterations, prompts
        )
        result["prompt_tokens"] = 128
        result["text_prompt_tokens_mean"] = sum(text_tokens) / len(text_tokens)
        return result
