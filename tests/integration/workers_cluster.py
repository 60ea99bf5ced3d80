"""The worker set most worker tests share, and the reference outputs they compare against.

One set per test session (see :func:`cluster`): two prefill workers, one decode worker fed
by both, and one colocated worker, all real processes on loopback, registered in a real
Redis. Expected tokens come from the single-process engine (``engine.LLM``) run greedily
in the test process.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.integration.workers_harness import SMALL_ENGINE, WorkerProcess, start_workers

NAMESPACE = "workers-test"
PREFILL_TIMEOUT_S = 4.0  # the decode worker's bound on Prefill RPC + KV landing

_TEXTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):\n    ",
    "List three reasons why the sky appears blue during the day:",
    "Translate to French: The weather is nice today and we are going to the park.",
    "In machine learning, a transformer is",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Water boils at",
    "Write a haiku about autumn leaves falling in the quiet forest at dusk.",
    "The history of the Roman Empire spans many centuries, beginning with",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,",
    "Photosynthesis is the process by which plants",
    "Dear hiring manager, I am writing to apply for the position of",
    "The three laws of motion formulated by Isaac Newton are " * 3,
    "Q: What is the largest planet in the solar system?\nA:",
    "A recipe for pancakes: first, mix flour, eggs and milk, then",
]
MAX_TOKENS = 12


@dataclass
class Cluster:
    prefill: list[WorkerProcess]
    decode: WorkerProcess
    colocated: WorkerProcess
    redis_url: str
    channels: dict[str, grpc.Channel]

    def channel(self, worker: WorkerProcess) -> grpc.Channel:
        if worker.name not in self.channels:
            self.channels[worker.name] = grpc.insecure_channel(worker.grpc_address)
        return self.channels[worker.name]

    @property
    def workers(self) -> list[WorkerProcess]:
        return [*self.prefill, self.decode, self.colocated]


@functools.cache
def reference_llm() -> object:
    from engine import LLM

    return LLM(dtype="float32", num_kv_blocks=256, num_threads=1)  # = SMALL_ENGINE's dtype


@functools.cache
def prompts() -> list[list[int]]:
    llm = reference_llm()
    return [llm.engine.encode(text) for text in _TEXTS]


@functools.cache
def expected(max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    from engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return [out.token_ids for out in reference_llm().generate(prompts(), params)]


_SESSION: Cluster | None = None


def start_cluster(redis_url: str, log_dir: Path) -> Cluster:
    common = ["--redis-url", redis_url, "--namespace", NAMESPACE, *SMALL_ENGINE]
    specs = [
        ("prefill_worker", "prefill-a", common),
        ("prefill_worker", "prefill-b", common),
        ("decode_worker", "decode-a", [*common, "--prefill-timeout", str(PREFILL_TIMEOUT_S)]),
        ("decode_worker", "colocated-a", [*common, "--colocated"]),
    ]
    p1, p2, d, c = start_workers(specs, log_dir)
    return Cluster([p1, p2], d, c, redis_url, {})


@pytest.fixture(scope="session", name="cluster")
def cluster_fixture(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """``cluster``: import ``cluster_fixture`` to use it. Modules that do share one set:
    started once, killed at the end of the session."""
    global _SESSION
    if _SESSION is None:
        _SESSION = start_cluster(redis_url, tmp_path_factory.mktemp("workers"))
    yield _SESSION
    if _SESSION is not None:
        for channel in _SESSION.channels.values():
            channel.close()
        for worker in _SESSION.workers:
            worker.kill()
        _SESSION = None
