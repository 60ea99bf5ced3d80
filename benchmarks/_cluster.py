"""Worker processes and a private redis-server for benchmarks: start, wait, always kill.

Usage::

    specs = [WorkerSpec("prefill_worker", "prefill-0", ("--num-threads", "1"))]
    with LocalCluster(specs, log_dir) as cluster:
        address = cluster["prefill-0"].grpc_address

:class:`LocalCluster` starts a throw-away ``redis-server`` on a free 127.0.0.1 port (no
persistence), then every worker (``python -m prefill_worker`` / ``python -m decode_worker``)
at once so their model loads overlap, and waits for each one's ready line and gRPC health.
Each worker runs in its own process group (its own session, so a Ctrl-C in the terminal
reaches only the benchmark), and leaving the ``with`` block — normally, on an exception,
on Ctrl-C, or on SIGTERM / SIGHUP once :func:`exit_on_signals` is active — SIGKILLs every
group and reaps it. Every wait is bounded. Worker stderr goes to ``<log_dir>/<name>.log``.

This is a benchmark copy of the test harness's approach (tests/integration/workers_harness.py
and tests/redis_server.py); benchmarks do not import from tests/.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

REPO_ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"^(\w+) worker (\S+) serving gRPC on (\S+) kv (\S+) metrics (\S+)$")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    module: str  # "prefill_worker" | "decode_worker"
    name: str  # --worker-id, and the log file's name
    args: tuple[str, ...] = ()  # further flags (the cluster adds --worker-id and --redis-url)


def worker_env(threads: int = 1) -> dict[str, str]:
    """Offline, loopback-only, ``threads`` BLAS/OpenMP threads, cache in ``<repo>/.cache``."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PDSERVE_CACHE_DIR": os.environ.get("PDSERVE_CACHE_DIR", str(REPO_ROOT / ".cache")),
    }


# --------------------------------------------------------------------------- workers


class WorkerProcess:
    """One worker process in its own process group; addresses filled in by wait_ready."""

    def __init__(self, spec: WorkerSpec, extra_args: Sequence[str], log_dir: Path) -> None:
        self.spec = spec
        self.name = spec.name
        self.log_path = log_dir / f"{spec.name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the process
        threads = _flag_value(spec.args, "--num-threads") or "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", spec.module, "--worker-id", spec.name, *extra_args, *spec.args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=REPO_ROOT,
            env=worker_env(int(threads)),
            start_new_session=True,  # own group: kill() takes its children too
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name=f"{spec.name}-stdout", daemon=True).start()
        self.role = ""
        self.worker_id = ""
        self.grpc_address = ""
        self.kv_address = ""
        self.metrics_address = ""

    def _read(self) -> None:  # keeps draining stdout after the ready line: the pipe never fills
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name} not ready in {timeout_s:.0f}s\n{self.log_tail()}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.name} exited ({self.proc.poll()})\n{self.log_tail()}")
            match = READY.match(line)
            if match:
                fields = match.groups()
                self.role, self.worker_id, self.grpc_address = fields[:3]
                self.kv_address, self.metrics_address = fields[3:]
                _wait_healthy(self.grpc_address, max(deadline - time.monotonic(), 1.0))
                return

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._log.close()

    def log_tail(self, chars: int = 4000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(args[:-1]):
        if arg == flag:
            return args[i + 1]
    return None


def _wait_healthy(address: str, timeout_s: float) -> None:
    from common.grpc_server import wait_healthy  # the repo is on sys.path by now

    wait_healthy(address, timeout_s=timeout_s)


# --------------------------------------------------------------------------- redis


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private redis-server on a free loopback port; no RDB / AOF; killed by stop()."""

    def __init__(self, workdir: Path, startup_timeout_s: float = 10.0, attempts: int = 5) -> None:
        self._workdir = workdir
        self._timeout_s = startup_timeout_s
        self._attempts = attempts
        self._proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("redis-server not started")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
        errors: list[str] = []
        for _ in range(self._attempts):  # the port may be taken between pick and bind
            port = _free_port()
            if self._try_start(binary, port, errors):
                self.port = port
                return
        raise RuntimeError("redis-server did not start:\n" + "\n".join(errors))

    def _try_start(self, binary: str, port: int, errors: list[str]) -> bool:
        import redis

        log_path = self._workdir / f"redis-{port}.log"
        cmd = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._workdir),
            "--logfile", str(log_path),
            "--daemonize", "no",
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + self._timeout_s
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    log = log_path.read_text() if log_path.exists() else ""
                    errors.append(f"port {port}: exited {proc.returncode}: {log[-500:]}")
                    return False
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        self._proc = proc
                        return True
                time.sleep(0.02)
        finally:
            client.close()
        errors.append(f"port {port}: no PING answer within {self._timeout_s}s")
        proc.kill()
        proc.wait()
        return False

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=10)
            self._proc = None
        self.port = None


# --------------------------------------------------------------------------- cluster


class LocalCluster:
    """A private Redis plus the given workers; everything is killed on exit."""

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
        self.redis = RedisServer(log_dir)
        self.workers: dict[str, WorkerProcess] = {}

    def __getitem__(self, name: str) -> WorkerProcess:
        return self.workers[name]

    def start(self) -> LocalCluster:
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.redis.start()
            extra = ("--redis-url", self.redis.url, "--namespace", self.namespace)
            for spec in self.specs:  # all first, so model loads overlap
                self.workers[spec.name] = WorkerProcess(spec, extra, self.log_dir)
            deadline = time.monotonic() + self.ready_timeout_s
            for worker in self.workers.values():
                worker.wait_ready(max(deadline - time.monotonic(), 1.0))
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

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- process hygiene


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM / SIGHUP so every ``finally`` runs."""


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """Turn SIGTERM / SIGHUP into :class:`Terminated` (SIGINT already raises
    KeyboardInterrupt); previous handlers are restored on exit. Main thread only."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(f"signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def log_directory(path: str | Path | None, keep: bool) -> Iterator[Path]:
    """``path`` if given (kept); else a temp dir removed on success unless ``keep``.
    A temp dir is kept when the block raises, so the worker logs can be read."""
    if path is not None:
        target = Path(path)
        target.mkdir(parents=True, exist_ok=True)
        yield target
        return
    target = Path(tempfile.mkdtemp(prefix="pdserve-bench-"))
    try:
        yield target
    except BaseException:
        print(f"worker logs kept in {target}", file=sys.stderr)
        raise
    if keep:
        print(f"worker logs kept in {target}")
    else:
        shutil.rmtree(target, ignore_errors=True)
