"""pdserve's own servers as child processes: a worker or the router, started with its
flags, its ready line parsed, its gRPC health awaited, always killed.

    workers = start_workers([WorkerSpec("prefill_worker", "prefill-0", flags)], log_dir)
    workers[0].grpc_address, workers[0].kv_address        # from the worker's ready line
    router = RouterProcess(["--redis-url", url, "--port", "0"], log_dir / "router.log")
    router.wait_ready().address

Both are :class:`common.launch.ChildProcess` (own process group, stderr to a log, killed
with their whole group). A worker's ready line is :mod:`common.ready_line`'s; the router
prints ``router serving gRPC on H:P http H:P|- metrics H:P|- pools a,b`` (``python -m
router``). A RouterProcess serves HTTP on a free port unless ``args`` name ``--http-port``
(children never take the default 8000).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import grpc

from common.grpc_server import wait_healthy
from common.launch import ChildProcess, child_env
from common.ready_line import Ready, RouterReady, parse_ready, parse_router_ready

# --------------------------------------------------------------------------- workers


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    module: str  # "prefill_worker" | "decode_worker"
    name: str  # --worker-id, and the log file's name
    args: tuple[str, ...] = ()  # every other flag
    threads: int = 1  # OMP / MKL threads of the process (pass --num-threads in args too)


class WorkerProcess(ChildProcess):
    """``python -m <module> --worker-id <name> <args>``; :meth:`wait_ready` reads its
    ready line and waits for its gRPC health."""

    def __init__(
        self, spec: WorkerSpec, log_dir: Path, env: Mapping[str, str] | None = None
    ) -> None:
        command = [sys.executable, "-m", spec.module, "--worker-id", spec.name, *spec.args]
        super().__init__(command, log_dir / f"{spec.name}.log", env or child_env(spec.threads))
        self.spec = spec
        self.ready: Ready | None = None

    def wait_ready(self, timeout_s: float = 180.0) -> Self:
        deadline = time.monotonic() + timeout_s
        self.ready = self.wait_for_line(parse_ready, timeout_s)
        wait_healthy(self.grpc_address, timeout_s=max(deadline - time.monotonic(), 1.0))
        return self

    def _ready(self) -> Ready:
        if self.ready is None:
            raise RuntimeError(f"{self.name}: not ready yet")
        return self.ready

    @property
    def worker_id(self) -> str:
        return self._ready().worker_id

    @property
    def grpc_address(self) -> str:
        return self._ready().grpc_address

    @property
    def kv_address(self) -> str | None:
        return self._ready().kv_address

    @property
    def metrics_address(self) -> str | None:
        return self._ready().metrics_address


def start_workers(
    specs: Sequence[WorkerSpec], log_dir: Path, timeout_s: float = 180.0
) -> list[WorkerProcess]:
    """Start every worker at once (their model loads overlap), then wait for each; if
    any fails to come up, all are killed."""
    workers: list[WorkerProcess] = []
    try:
        for spec in specs:
            workers.append(WorkerProcess(spec, log_dir))
        deadline = time.monotonic() + timeout_s
        for worker in workers:
            worker.wait_ready(max(deadline - time.monotonic(), 1.0))
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    return workers


# --------------------------------------------------------------------------- the router


class RouterProcess(ChildProcess):
    """``python -m router <args>``; :meth:`wait_ready` reads its ready line and waits for
    its gRPC health."""

    def __init__(
        self, args: Sequence[str], log: Path, env: Mapping[str, str] | None = None
    ) -> None:
        args = list(args) if "--http-port" in args else [*args, "--http-port", "0"]
        super().__init__([sys.executable, "-m", "router", *args], log, env or child_env(1))
        self.ready: RouterReady | None = None

    def wait_ready(
        self, timeout_s: float = 120.0, credentials: grpc.ChannelCredentials | None = None
    ) -> Self:
        """``credentials``: the channel credentials of a router serving TLS."""
        deadline = time.monotonic() + timeout_s
        self.ready = self.wait_for_line(parse_router_ready, timeout_s)
        remaining = max(deadline - time.monotonic(), 1.0)
        wait_healthy(self.address, timeout_s=remaining, credentials=credentials)
        return self

    @property
    def address(self) -> str:
        if self.ready is None:
            raise RuntimeError(f"{self.name}: not ready yet")
        return self.ready.grpc_address

    @property
    def http_address(self) -> str | None:
        return self.ready.http_address if self.ready is not None else None

    @property
    def metrics_address(self) -> str | None:
        return self.ready.metrics_address if self.ready is not None else None
