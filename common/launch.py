"""Child processes and their environment: the one place tests, benchmarks and the load
generator start a process, wait for it, and kill it.

    env = child_env(threads=1)                       # offline, loopback, 1 BLAS thread
    with ChildProcess([sys.executable, "-m", "tests.integration.kv_peer"], log, env,
                      stdin=True) as peer:           # SIGKILLed with its group on exit
        reply = peer.next_line(timeout_s=60)         # a line of its stdout, bounded
        peer.wait_for_line(parse_ready, timeout_s=60)  # or: the first line parse accepts
    port = free_loopback_port()
    wait_until(lambda: len(seen()) == 2, timeout_s=20, what="both workers registered")

A :class:`ChildProcess` runs in its own session, so it is its own process group: a Ctrl-C
in the terminal reaches only the parent, and :meth:`ChildProcess.kill` takes the child's
own children too. A thread drains its stdout into a queue (the pipe never fills; ready
lines and request/reply protocols read from it); its stderr goes to a log file whose tail
every error message carries. Leaving the ``with`` block — normally, on an exception, or on
SIGTERM / SIGHUP once :func:`exit_on_signals` is active — SIGKILLs the group and reaps it.
Every wait is bounded. pdserve's own servers (workers, the router) are launched through
:mod:`common.server_process`, the private redis-server through :mod:`common.redis_process`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Self, TypeVar

from common.env import offline_defaults

REPO_ROOT = Path(__file__).resolve().parents[1]
_T = TypeVar("_T")
_PR_SET_PDEATHSIG = 1
_SIGTERM = signal.SIGTERM  # a default argument of ChildProcess, whose .signal() shadows it


def child_env(threads: int | None = 1, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child: offline, gloo on loopback, ``threads``
    OpenMP / MKL threads (None: unchanged), and the repo root first on ``PYTHONPATH`` (so
    ``python -m <package>`` and ``python -m tests...`` work from any directory). The model
    cache is this process's (``common.env.cache_dir()``), like every entry point's."""
    env = {**os.environ, **offline_defaults()}
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env.update(extra or {})
    return env


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now (it may be taken before it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05
) -> None:
    """Poll ``predicate`` until it is true; TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(poll_s)


async def wait_until_async(
    predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.02
) -> None:
    """:func:`wait_until` for a coroutine: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(poll_s)


# --------------------------------------------------------------------------- one child


class ChildProcess:
    """``command`` in its own session; stdout lines queued, stderr to ``log``; always killed.

    ``stdin=True`` opens a pipe for :meth:`write_line` (a line protocol with the child);
    otherwise stdin is /dev/null. ``die_with_parent`` (Linux) has the kernel SIGTERM the
    child when the thread that started it exits, so it cannot outlive a parent killed
    outright.
    """

    def __init__(
        self,
        command: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        *,
        cwd: Path = REPO_ROOT,
        stdin: bool = False,
        die_with_parent: bool = False,
    ) -> None:
        self.log_path = log
        self.name = log.stem
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[str] = open(log, "w")  # noqa: SIM115 - lives as long as the process
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=cwd,
            env=dict(env) if env is not None else child_env(),
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
        threading.Thread(target=self._read, name=f"{self.name}-stdout", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def next_line(self, timeout_s: float) -> str | None:
        """The next stdout line; None once the child closed stdout (exited); TimeoutError
        if none comes within ``timeout_s``."""
        try:
            return self._lines.get(timeout=max(timeout_s, 0.0))
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no output within {timeout_s:g}s") from None

    def wait_for_line(self, parse: Callable[[str], _T | None], timeout_s: float) -> _T:
        """The first stdout line that ``parse`` accepts, parsed. RuntimeError if the child
        exits first, TimeoutError when time runs out (both with the log's tail)."""
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.next_line(min(remaining, 0.5))
            except TimeoutError:
                continue
            if line is None:
                raise RuntimeError(f"{self.name} exited ({self.proc.wait()}):\n{self.log_tail()}")
            parsed = parse(line)
            if parsed is not None:
                return parsed
        raise TimeoutError(f"{self.name} not ready in {timeout_s:g}s:\n{self.log_tail()}")

    def wait_for(self, probe: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Until ``probe()`` is true while the child lives (e.g. an HTTP health check)."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}"
                )
            return probe()

        try:
            wait_until(ready, timeout_s, f"{self.name}: {what}", poll_s=0.2)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log_tail()}") from None

    def write_line(self, text: str) -> None:
        assert self.proc.stdin is not None, "started without stdin=True"
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child's whole process group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def wait_exit(self, timeout_s: float) -> int:
        return self.proc.wait(timeout=timeout_s)

    def terminate(self, sig: int = _SIGTERM, grace_s: float = 10.0) -> int | None:
        """``sig`` to the group, up to ``grace_s`` to exit, then :meth:`kill`; the exit
        code if it exited by itself in time."""
        code = None
        if self.alive():
            self.signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(timeout=grace_s)
        self.kill()
        return code if code is not None else self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole group and reap the child; idempotent."""
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self._log):
            if stream is not None and not stream.closed:
                with contextlib.suppress(OSError):
                    stream.close()

    def log_tail(self, chars: int | None = 4000) -> str:
        """The end of the child's stderr log (all of it with ``chars=None``)."""
        if not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return text if chars is None else text[-chars:]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent thread exits (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# --------------------------------------------------------------------------- the parent


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM / SIGHUP so every ``finally`` runs."""


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """Turn SIGTERM / SIGHUP into :class:`Terminated` (SIGINT already raises
    KeyboardInterrupt) so children started in the block are killed; previous handlers
    are restored on exit. Main thread only."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(f"signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
