"""A private redis-server: loopback only, no persistence, dies with us.

    with RedisProcess() as redis_server:
        redis_server.url            # redis://:PASSWORD@127.0.0.1:PORT/0

``pdserve up``, the tests and the benchmark stacks all use this one. It is a
:class:`common.launch.ChildProcess`: its own session, so a Ctrl-C in the terminal reaches
``pdserve up`` (which stops it in order, after the app has drained) rather than the
registry under a draining app; and ``die_with_parent``, so it cannot outlive a parent
that was killed outright. Picking a free port and binding it are two steps (the machine
may be shared), so start() retries on a fresh port.

Every start generates a password (``requirepass``, written to a config file of mode 0600
rather than on the command line, where ``ps`` shows it): other users of a shared machine
cannot read or write the registry. ``url`` carries it; log :func:`redact_url` of it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import redis

from common.launch import ChildProcess, free_loopback_port
from common.redis_client import url_with_password
from common.service import Service

INSTALL_HINT = "redis-server is not on PATH: `apt-get install redis-server` (or `make setup`)"


class RedisProcess(Service):
    def __init__(
        self, startup_timeout_s: float = 10.0, attempts: int = 5, *, password: bool = True
    ) -> None:
        self._timeout_s = startup_timeout_s
        self._attempts = attempts
        self._child: ChildProcess | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.port: int | None = None
        self.password: str | None = secrets.token_hex(24) if password else None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("redis-server not started")
        url = self.url_without_password
        return url_with_password(url, self.password) if self.password else url

    @property
    def url_without_password(self) -> str:
        """For configs that others can read; the password then travels as a file."""
        if self.port is None:
            raise RuntimeError("redis-server not started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def start(self) -> RedisProcess:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        self._tmp = tempfile.TemporaryDirectory(prefix="pdserve-redis-")
        errors: list[str] = []
        for _ in range(self._attempts):
            port = free_loopback_port()
            if self._try_start(binary, port, Path(self._tmp.name), errors):
                self.port = port
                return self
        self.stop()
        raise RuntimeError("redis-server did not start:\n" + "\n".join(errors))

    def stop(self) -> None:
        if self._child is not None:
            self._child.terminate(grace_s=10)
            self._child = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self.port = None

    def _try_start(self, binary: str, port: int, workdir: Path, errors: list[str]) -> bool:
        log_path = workdir / f"redis-{port}.log"
        conf = workdir / f"redis-{port}.conf"
        if self.password is not None:  # the config file, mode 0600: not on the command line
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"requirepass {self.password}\n")
        else:
            conf.write_text("")
        cmd = [
            binary,
            str(conf),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--logfile", str(log_path),
            "--daemonize", "no",
        ]  # fmt: skip
        child = ChildProcess(
            cmd, workdir / f"redis-{port}.out", env=None, cwd=workdir, die_with_parent=True
        )
        client = redis.Redis(
            host="127.0.0.1", port=port, password=self.password, socket_connect_timeout=0.5
        )
        deadline = time.monotonic() + self._timeout_s
        try:
            while time.monotonic() < deadline:
                if not child.alive():  # e.g. the port was taken between pick and bind
                    log = log_path.read_text() if log_path.exists() else ""
                    errors.append(f"port {port}: exited {child.proc.returncode}: {log[-500:]}")
                    child.kill()
                    return False
                try:
                    if client.ping():
                        self._child = child
                        return True
                except redis.ConnectionError:
                    time.sleep(0.02)
        finally:
            client.close()
        errors.append(f"port {port}: no PING answer within {self._timeout_s}s")
        child.kill()
        return False
