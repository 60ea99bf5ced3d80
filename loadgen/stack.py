"""Serving stacks the suite compares, started locally on 127.0.0.1 and always torn down.

    with OurStack(disaggregated(), log_dir) as stack:      # redis + workers + router
        run_experiment(stack.url, ...)                     # grpc://127.0.0.1:PORT
        stack.worker_status()                              # leak check once idle
    with TransformersServe(log_dir) as peer:               # `transformers serve`
        run_experiment(peer.url, RunSpec(..., model=peer.model), ...)

Every worker uses one torch thread and the same engine flags, so the configurations of a
comparison differ only in their shape (1P+1D vs 2 colocated), the router's policy, or the
one setting a configuration is named after (``colocated-256``: a 256-token step budget;
``disaggregated-page-first``: page-first KV caches; ``disaggregated-conditional``: the
router's conditional disaggregation with its default thresholds). The processes are launched through
:mod:`common.server_process` and :mod:`common.redis_process`, like the tests' and
``pdserve up``'s.
"""

from __future__ import annotations

import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.launch import ChildProcess, child_env, free_loopback_port
from common.redis_process import RedisProcess
from common.server_process import RouterProcess, WorkerProcess, WorkerSpec, start_workers
from common.service import Service


@dataclass(frozen=True, slots=True)
class StackSpec:
    name: str
    workers: tuple[WorkerSpec, ...]
    policy: str = "prefix_aware"
    load_weight: float | None = None  # prefix_aware's weight of queued tokens (None: default)
    conditional: Mapping[str, object] | None = None  # the pool's `conditional:`; None: off
    # more keys of the router's pool (e.g. max_in_flight / max_queued: admission bounds)
    pool_options: Mapping[str, object] | None = None

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


def disaggregated(
    num_kv_blocks: int = 1024,
    policy: str = "prefix_aware",
    kv_cache_order: str = "",
    conditional: Mapping[str, object] | None = None,
) -> StackSpec:
    """One prefill worker and one decode worker (layer-wise KV transfer). The decode
    worker fails a request whose prefill failed (``--on-prefill-failure fail``) rather
    than prefill it itself, so the numbers are the disaggregated path's or an error."""
    flags = engine_flags(num_kv_blocks)
    name = "disaggregated"
    if kv_cache_order:
        flags = (*flags, "--kv-cache-order", kv_cache_order)
        name = f"disaggregated-{kv_cache_order.replace('_', '-')}"
    if conditional is not None:
        name = "disaggregated-conditional"
    decode = ("--prefill-timeout", "600", "--on-prefill-failure", "fail", "--layer-wise")
    workers = (
        WorkerSpec("prefill_worker", "prefill-0", flags),
        WorkerSpec("decode_worker", "decode-0", (*flags, *decode)),
    )
    return StackSpec(name, workers, policy, conditional=conditional)


def colocated(
    count: int = 2, num_kv_blocks: int = 1024, policy: str = "prefix_aware", budget: int = 1024
) -> StackSpec:
    """``count`` workers that each prefill and decode their own requests."""
    flags = (*engine_flags(num_kv_blocks, budget), "--colocated")
    workers = tuple(WorkerSpec("decode_worker", f"colocated-{i}", flags) for i in range(count))
    name = "colocated" if count > 1 else "colocated-1"
    return StackSpec(name if budget == 1024 else f"{name}-{budget}", workers, policy)


# The configurations the `disagg` scenario can compare (`pdserve bench suite --configs`).
DISAGG_CONFIGS: dict[str, Callable[[], StackSpec]] = {
    "disaggregated": disaggregated,
    "colocated": colocated,
    # smaller prefill chunks: colocated serving's own mitigation, the baseline's best shot
    "colocated-256": lambda: colocated(budget=256),
    # whole-block KV layout; its layer-wise sends stage every block
    "disaggregated-page-first": lambda: disaggregated(kv_cache_order="page_first"),
    # short and cached prompts prefill on the decode worker (router.disagg_policy defaults)
    "disaggregated-conditional": lambda: disaggregated(conditional={}),
}


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


class LocalCluster(Service):
    """A private redis-server plus the given workers, all started at once (model loads
    overlap); everything is killed on exit."""

    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        log_dir: Path,
        namespace: str = "pdserve-bench",
        ready_timeout_s: float = 180.0,
    ) -> None:
        self.specs = list(specs)
        self.log_dir = log_dir
        self.namespace = namespace
        self.ready_timeout_s = ready_timeout_s
        self.redis = RedisProcess()
        self.workers: dict[str, WorkerProcess] = {}

    def __getitem__(self, name: str) -> WorkerProcess:
        return self.workers[name]

    def start(self) -> LocalCluster:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.redis.start()
            extra = ("--redis-url", self.redis.url, "--namespace", self.namespace)
            specs = [WorkerSpec(s.module, s.name, (*extra, *s.args), s.threads) for s in self.specs]
            for worker in start_workers(specs, self.log_dir, self.ready_timeout_s):
                self.workers[worker.spec.name] = worker
        except BaseException:
            self.stop()
            raise
        return self

    def dead_workers(self) -> list[str]:
        return [name for name, worker in self.workers.items() if not worker.alive()]

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.kill()
        self.redis.stop()


class OurStack(Service):
    """Private redis-server, the spec's workers, and ``python -m router`` with its policy."""

    def __init__(self, spec: StackSpec, log_dir: Path, ready_timeout_s: float = 300.0) -> None:
        self.spec = spec
        self.log_dir = log_dir / spec.name
        self._timeout_s = ready_timeout_s
        self._cluster = LocalCluster(spec.workers, self.log_dir, namespace=f"bench-{spec.name}")
        self._router: RouterProcess | None = None
        self.url = ""
        self.http_url = ""  # the router's OpenAI-compatible HTTP API

    def start(self) -> OurStack:
        self._cluster.start()
        try:
            config = self.log_dir / "router.yaml"
            config.write_text(yaml.safe_dump({"pools": [self._pool()]}))
            self._router = RouterProcess(
                ["--config", str(config), "--redis-url", self._cluster.redis.url,
                 "--namespace", self._cluster.namespace, "--port", "0",
                 "--log-level", "WARNING"],
                self.log_dir / "router.log",
            ).wait_ready()  # fmt: skip
            self.url = f"grpc://{self._router.address}"
            self.http_url = f"http://{self._router.http_address}"
            wait_for_workers(self._router.address, self.spec, self._timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _pool(self) -> dict[str, object]:
        pool: dict[str, object] = {"name": "default", "policy": self.spec.policy}
        if self.spec.load_weight is not None:
            pool["load_weight"] = self.spec.load_weight
        if self.spec.conditional is not None:
            pool["conditional"] = dict(self.spec.conditional)
        pool.update(self.spec.pool_options or {})
        return pool

    def dead(self) -> list[str]:
        dead = self._cluster.dead_workers()
        if self._router is not None and not self._router.alive():
            dead.append("router")
        return dead

    def worker_status(self, timeout_s: float = 15.0) -> dict[str, dict[str, Any]]:
        """Each worker's KV blocks once it runs nothing (or after ``timeout_s``): used
        blocks on an idle worker would be a leak. A worker that cannot answer gets
        ``{"error": ...}``: the run's measurements are kept either way."""
        import grpc

        status: dict[str, dict[str, Any]] = {}
        for name, worker in self._cluster.workers.items():
            try:
                status[name] = idle_status(worker.grpc_address, timeout_s)
            except grpc.RpcError as exc:
                status[name] = {"error": f"{exc.code().name}: {exc.details()}"[:500]}
        return status

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


def idle_status(address: str, timeout_s: float) -> dict[str, Any]:
    """A worker's ``WorkerControl.GetStatus`` once it is idle with no used block, or the
    last one after ``timeout_s``."""
    import grpc

    from proto import worker_pb2, worker_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerControlStub(channel)
        deadline = time.monotonic() + timeout_s
        while True:
            s = stub.GetStatus(worker_pb2.GetStatusRequest(), timeout=10)
            idle = s.running == 0 and s.waiting == 0 and s.in_flight_transfers == 0
            if (idle and s.used_blocks == 0) or time.monotonic() > deadline:
                return {
                    "idle": idle,
                    "used_blocks": s.used_blocks,
                    "free_blocks": s.free_blocks,
                    "cached_blocks": s.cached_blocks,
                    "total_blocks": s.total_blocks,
                }
            time.sleep(0.2)


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
        port = free_loopback_port()
        self.url = f"http://127.0.0.1:{port}"
        binary = Path(sys.executable).with_name("transformers")
        command = [str(binary), "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--device", "cpu", "--log-level", "warning", self.model]  # fmt: skip
        self._proc = ChildProcess(command, self.log_dir / "serve.log", child_env(self._threads))
        try:
            self._proc.wait_for(lambda: http_ok(self.url + "/health"), 180.0, "GET /health")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc = None


def http_ok(url: str) -> bool:
    """Does ``url`` answer 200 within a second (a server's health probe)?"""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status == 200
    except OSError:
        return False
