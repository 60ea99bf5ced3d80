"""A private, throw-away redis-server for tests: loopback only, no persistence.

Usage::

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)

The server runs in its own temp directory on a free 127.0.0.1 port and never writes an RDB
or AOF file. Picking a free port and binding it are two steps, so another process (the
machine is shared) may take the port in between: start() retries on a fresh port.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

INSTALL_HINT = (
    "redis-server is not on PATH. Run `make test` (it installs Debian's redis-server via "
    "scripts/ensure_redis.sh), or `apt-get install redis-server`."
)


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process; ``start`` waits for PING, ``stop`` terminates and reaps."""

    def __init__(self, startup_timeout_s: float = 10.0, attempts: int = 5) -> None:
        self._timeout_s = startup_timeout_s
        self._attempts = attempts
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("RedisServer not started")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        self._tmp = tempfile.TemporaryDirectory(prefix="pdserve-redis-")
        errors: list[str] = []
        for _ in range(self._attempts):
            port = _free_port()
            if self._try_start(binary, port, Path(self._tmp.name), errors):
                self.port = port
                return self
        self.stop()
        raise RuntimeError("redis-server did not start:\n" + "\n".join(errors))

    def _try_start(self, binary: str, port: int, workdir: Path, errors: list[str]) -> bool:
        log_path = workdir / f"redis-{port}.log"
        cmd = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--logfile", str(log_path),
            "--daemonize", "no",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + self._timeout_s
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:  # e.g. port taken between pick and bind
                    log = log_path.read_text() if log_path.exists() else ""
                    errors.append(f"port {port}: exited {proc.returncode}: {log[-500:]}")
                    return False
                try:
                    if client.ping():
                        self._proc = proc
                        return True
                except redis.ConnectionError:
                    time.sleep(0.02)
        finally:
            client.close()
        errors.append(f"port {port}: no PING answer within {self._timeout_s}s")
        proc.kill()
        proc.wait()
        return False

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self.port = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
