"""Serving stacks the suite compares, started locally on 127.0.0.1 and always torn down.

    with OurStack(disaggregated(), log_dir) as stack:      # redis + workers + router
        run_experiment(stack.url, ...)                     # grpc://127.0.0.1:PORT
    with TransformersServe(log_dir) as peer:               # `transformers serve`
        run_experiment(peer.url, RunSpec(..., model=peer.model), ...)

Every worker uses one torch thread and the same engine flags, so the configurations of a
comparison differ only in their shape (1P+1D vs 2 colocated) or the router's policy.
"""

from __future__ import annotations

import re
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from benchmarks._cluster import (
    ChildProcess,
    LocalCluster,
    WorkerSpec,
    start_ready,
    worker_env,
)
from common.service import Service
from deploy.redis_process import free_loopback_port

ROUTER_READY = re.compile(r"^router serving gRPC on (\S+) metrics (\S+) pools (\S+)$")


@dataclass(frozen=True, slots=True)
class StackSpec:
    name: str
    workers: tuple[WorkerSpec, ...]
    policy: str = "prefix_aware"
    load_weight: float | None = None  # prefix_aware's weight of queued tokens (None: default)

    @property
    def num_prefill(self) -> int:
        return sum(1 for w in self.workers if w.module == "prefill_worker")

    @property
    def num_decode(self) -> int:
        return len(self.workers) - self.num_prefill


def engine_flags(num_kv_blocks: int = 1024, budget: int = 1024) -> tuple[str, ...]:
    return (
        "--num-threads", "1",
        "--num-kv-blocks", str(num_kv_blocks),
        "--max-num-batched-tokens", str(budget),
    )  # fmt: skip


def disaggregated(num_kv_blocks: int = 1024, policy: str = "prefix_aware") -> StackSpec:
    """One prefill worker and one decode worker (layer-wise KV transfer)."""
    flags = engine_flags(num_kv_blocks)
    decode = ("--prefill-timeout", "600", "--layer-wise")
    workers = (
        WorkerSpec("prefill_worker", "prefill-0", flags),
        WorkerSpec("decode_worker", "decode-0", (*flags, *decode)),
    )
    return StackSpec("disaggregated", workers, policy)


def colocated(count: int = 2, num_kv_blocks: int = 1024, policy: str = "prefix_aware") -> StackSpec:
    """``count`` workers that each prefill and decode their own requests."""
    flags = (*engine_flags(num_kv_blocks), "--colocated")
    workers = tuple(WorkerSpec("decode_worker", f"colocated-{i}", flags) for i in range(count))
    return StackSpec("colocated" if count > 1 else "colocated-1", workers, policy)


def two_prefill(policy: str, prefill_kv_blocks: int, load_weight: float | None = None) -> StackSpec:
    """Two prefill workers (small prefix caches, so placement matters) and one decode."""
    prefill = engine_flags(prefill_kv_blocks)
    decode = (*engine_flags(2048), "--prefill-timeout", "600")
    workers = (
        WorkerSpec("prefill_worker", "prefill-0", prefill),
        WorkerSpec("prefill_worker", "prefill-1", prefill),
        WorkerSpec("decode_worker", "decode-0", decode),
    )
    return StackSpec(policy, workers, policy, load_weight)


class OurStack(Service):
    """Private redis-server, the spec's workers, and ``python -m router`` with its policy."""

    def __init__(self, spec: StackSpec, log_dir: Path, ready_timeout_s: float = 300.0) -> None:
        self.spec = spec
        self.log_dir = log_dir / spec.name
        self._timeout_s = ready_timeout_s
        self._cluster = LocalCluster(spec.workers, self.log_dir, namespace=f"bench-{spec.name}")
        self._router: ChildProcess | None = None
        self.url = ""

    def start(self) -> OurStack:
        self._cluster.start()
        try:
            config = self.log_dir / "router.yaml"
            config.write_text(yaml.safe_dump({"pools": [self._pool()]}))
            self._router = start_ready(
                [sys.executable, "-m", "router", "--config", str(config),
                 "--redis-url", self._cluster.redis.url,
                 "--namespace", self._cluster.namespace, "--port", "0",
                 "--log-level", "WARNING"],
                self.log_dir / "router.log",
                pattern=ROUTER_READY,
            )  # fmt: skip
            self.url = f"grpc://{self._router.address}"
            wait_for_workers(self._router.address, self.spec, self._timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _pool(self) -> dict[str, object]:
        pool: dict[str, object] = {"name": "default", "policy": self.spec.policy}
        if self.spec.load_weight is not None:
            pool["load_weight"] = self.spec.load_weight
        return pool

    def dead(self) -> list[str]:
        dead = self._cluster.dead_workers()
        if self._router is not None and not self._router.alive():
            dead.append("router")
        return dead

    def stop(self) -> None:
        if self._router is not None:
            self._router.kill()
            self._router = None
        self._cluster.stop()


def wait_for_workers(address: str, spec: StackSpec, timeout_s: float) -> None:
    """Until the router's ListModels shows every worker of ``spec`` as live."""
    from router.client import list_models

    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        cards = list_models(address)
        seen = [(c.prefill_workers, c.decode_workers) for c in cards]
        if (spec.num_prefill, spec.num_decode) in seen:
            return
        time.sleep(0.2)
    raise TimeoutError(f"router at {address} sees {seen}, wants {spec.workers}")


class TransformersServe(Service):
    """``transformers serve`` (OpenAI-compatible HTTP) on a free loopback port, one thread,
    preloading the same local model directory our workers use."""

    def __init__(self, log_dir: Path, model_dir: Path | None = None, threads: int = 1) -> None:
        from router.tokenizer import default_model_dir

        self.model = str(model_dir or default_model_dir())
        self.log_dir = log_dir / "transformers-serve"
        self._threads = threads
        self._proc: ChildProcess | None = None
        self.url = ""

    def start(self) -> TransformersServe:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        port = free_loopback_port()
        self.url = f"http://127.0.0.1:{port}"
        binary = Path(sys.executable).with_name("transformers")
        command = [str(binary), "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--device", "cpu", "--log-level", "warning", self.model]  # fmt: skip
        self._proc = start_ready(
            command,
            self.log_dir / "serve.log",
            probe=lambda: _http_ok(self.url + "/health"),
            env=worker_env(self._threads),
        )
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc = None


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status == 200
    except OSError:
        return False
