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

The registry is :class:`deploy.redis_process.RedisProcess`, the one ``pdserve up`` and the
tests use. :func:`start_ready` runs any other child (the router, ``transformers serve``)
the same way, as a :class:`ChildProcess`: its own session, a ready line or probe, always
killed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/<script>.py` without an install
    sys.path.insert(0, str(REPO_ROOT))

from common.service import Service  # noqa: E402
from deploy.redis_process import RedisProcess  # noqa: E402

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


class ChildProcess:
    """A child in its own session (so kill() takes its whole group). A thread drains its
    stdout into a queue for :meth:`wait_for_line`, so the pipe never fills; stderr goes to
    ``log``."""

    def __init__(
        self, command: Sequence[str], log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.log_path = log
        self.address = ""  # the ready line's first group, once seen
        self._log = open(log, "w")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=REPO_ROOT,
            env=env or worker_env(1),
            start_new_session=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name=f"{log.stem}-stdout", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_for_line(
        self,
        pattern: re.Pattern[str] | None,
        timeout_s: float,
        probe: Callable[[], bool] | None = None,
    ) -> re.Match[str] | None:
        """Until a stdout line matches ``pattern`` (returned; its first group is kept as
        ``address``) or ``probe()`` is true (None). Raises if the child exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.log_path.stem} exited\n{self.log_tail()}")
            if probe is not None and probe():
                return None
            try:
                line = self._lines.get(timeout=0.5)
            except queue.Empty:
                continue
            match = pattern.match(line) if pattern is not None and line is not None else None
            if match:
                self.address = match.group(1)
                return match
        raise TimeoutError(f"{self.log_path.stem} not ready in {timeout_s:.0f}s\n{self.log_tail()}")

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


def start_ready(
    command: Sequence[str],
    log: Path,
    pattern: re.Pattern[str] | None = None,
    probe: Callable[[], bool] | None = None,
    timeout_s: float = 180.0,
    env: dict[str, str] | None = None,
) -> ChildProcess:
    """Start a child and wait for its ready line (or probe); killed if it never gets there."""
    child = ChildProcess(command, log, env)
    try:
        child.wait_for_line(pattern, timeout_s, probe)
    except BaseException:
        child.kill()
        raise
    return child


# --------------------------------------------------------------------------- workers


class WorkerProcess(ChildProcess):
    """One worker process; its addresses are filled in by :meth:`wait_ready`."""

    def __init__(self, spec: WorkerSpec, extra_args: Sequence[str], log_dir: Path) -> None:
        threads = _flag_value(spec.args, "--num-threads") or "1"
        command = [sys.executable, "-m", spec.module, "--worker-id", spec.name,
                   *extra_args, *spec.args]  # fmt: skip
        super().__init__(command, log_dir / f"{spec.name}.log", worker_env(int(threads)))
        self.spec = spec
        self.name = spec.name
        self.role = ""
        self.worker_id = ""
        self.grpc_address = ""
        self.kv_address = ""
        self.metrics_address = ""

    def wait_ready(self, timeout_s: float) -> None:
        """The worker's ready line, then its gRPC health, within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        match = self.wait_for_line(READY, timeout_s)
        assert match is not None
        self.role, self.worker_id, self.grpc_address = match.groups()[:3]
        self.kv_address, self.metrics_address = match.groups()[3:]
        _wait_healthy(self.grpc_address, max(deadline - time.monotonic(), 1.0))


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(args[:-1]):
        if arg == flag:
            return args[i + 1]
    return None


def _wait_healthy(address: str, timeout_s: float) -> None:
    from common.grpc_server import wait_healthy  # the repo is on sys.path by now

    wait_healthy(address, timeout_s=timeout_s)


# --------------------------------------------------------------------------- cluster


class LocalCluster(Service):
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
        self.redis = RedisProcess()
        self.workers: dict[str, WorkerProcess] = {}

    def __getitem__(self, name: str) -> WorkerProcess:
        return self.workers[name]

    def start(self) -> LocalCluster:
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
