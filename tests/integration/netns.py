"""Two "hosts" on one machine: network namespaces joined only by a veth pair.

    with TwoHosts.create() as hosts:           # root only; fails (never skips) otherwise
        hosts.a.ip, hosts.a.ifname              # 198.18.0.1, the veth inside namespace A
        hosts.a.command(["redis-server", ...])  # argv that runs inside namespace A
        hosts.a.listeners()                     # `ss -ltnp` inside A, parsed
        hosts.a.kill_all()                      # SIGKILL every process in namespace A

Layout: namespaces ``<tag>a`` and ``<tag>b`` (``tag`` unique per run, so a crashed run's
leftovers never collide with the next one), each with ``lo`` up and one end of the veth,
addressed from the benchmarking range 198.18.0.0/15 (RFC 2544) as 198.18.0.1/30 and
198.18.0.2/30. No default route and no other interface: nothing in either namespace can
reach anything but the other namespace and its own loopback. Leaving the ``with`` block
(also on a failure) kills every process in both namespaces by pid (``ip netns pids``:
only what the test started lives there) and deletes the namespaces, which takes the veth
pair with them.

Ports inside a namespace are private to it, so fixed port numbers there cannot collide
with anything else on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

NET = "198.18.0"  # 198.18.0.0/15: reserved for benchmarks, never routed on the internet
PREFIX_LEN = 30

ROOT_HINT = (
    "the two-node test needs network namespaces (`ip netns add`, veth pairs): run it as "
    "root (CI does), e.g. `sudo -E .venv/bin/python -m pytest tests/integration/"
    "test_two_node.py`"
)


@dataclass(frozen=True, slots=True)
class Listener:
    """One listening TCP socket, as ``ss -ltnp`` shows it."""

    host: str  # 198.18.0.1, 127.0.0.1, 0.0.0.0, * or [::] (wildcards), ...
    port: int
    process: str  # the command name ss reports ("raylet", "ray::ServeRepli", ...)
    pid: int | None

    @property
    def wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "*", "[::]", "::")


@dataclass(frozen=True, slots=True)
class Connection:
    """One established TCP connection, as ``ss -tnp`` shows it."""

    local: tuple[str, int]
    peer: tuple[str, int]
    pid: int | None


@dataclass(frozen=True, slots=True)
class Host:
    """One namespace: its name, its veth end and that end's address."""

    netns: str
    ifname: str
    ip: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: Sequence[str], timeout_s: float = 30.0) -> str:
        """Run ``argv`` inside the namespace; its stdout (CalledProcessError on failure)."""
        done = subprocess.run(
            self.command(argv), capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if done.returncode != 0:
            raise subprocess.CalledProcessError(
                done.returncode, done.args, done.stdout, done.stderr
            )
        return done.stdout

    def pids(self) -> list[int]:
        out = subprocess.run(
            ["ip", "netns", "pids", self.netns], capture_output=True, text=True, check=False
        ).stdout
        return [int(p) for p in out.split()]

    def kill_all(self, timeout_s: float = 10.0) -> None:
        """SIGKILL every process in the namespace, by pid, until none is left."""
        deadline = time.monotonic() + timeout_s
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def listeners(self) -> list[Listener]:
        return [_listener(line) for line in self.run(["ss", "-Hltnp"]).splitlines() if line]

    def connections(self) -> list[Connection]:
        out = self.run(["ss", "-Htnp", "state", "established"])
        return [_connection(line) for line in out.splitlines() if line]

    def rx_bytes(self) -> int:
        """Bytes received on this namespace's veth end so far."""
        out = subprocess.run(
            ["ip", "-n", self.netns, "-s", "-j", "link", "show", "dev", self.ifname],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])


class TwoHosts:
    """Namespaces A and B and the veth between them; see the module doc."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.a = Host(f"{tag}a", f"{tag}va", f"{NET}.1")
        self.b = Host(f"{tag}b", f"{tag}vb", f"{NET}.2")

    @classmethod
    def create(cls) -> TwoHosts:
        """New namespaces; RuntimeError (with :data:`ROOT_HINT`) if they cannot be made."""
        hosts = cls(f"pdn{secrets.token_hex(3)}")  # interface names: at most 15 characters
        try:
            hosts._build()
        except (OSError, subprocess.CalledProcessError) as exc:
            hosts.delete()
            detail = getattr(exc, "stderr", "") or str(exc)
            raise RuntimeError(f"{ROOT_HINT}\n(ip said: {detail.strip()})") from None
        return hosts

    def _build(self) -> None:
        a, b = self.a, self.b
        steps = [
            ["ip", "netns", "add", a.netns],
            ["ip", "netns", "add", b.netns],
            ["ip", "link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname],
        ]
        for host in (a, b):
            steps += [
                ["ip", "link", "set", host.ifname, "netns", host.netns],
                ["ip", "-n", host.netns, "addr", "add", f"{host.ip}/{PREFIX_LEN}", "dev",
                 host.ifname],
                ["ip", "-n", host.netns, "link", "set", "lo", "up"],
                ["ip", "-n", host.netns, "link", "set", host.ifname, "up"],
            ]  # fmt: skip
        for step in steps:
            subprocess.run(step, capture_output=True, text=True, check=True, timeout=30)

    def delete(self) -> None:
        """Kill what runs in the namespaces, then remove them (and the veth); idempotent."""
        for host in (self.a, self.b):
            host.kill_all()
        for host in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, check=False)
        # The veth goes with its namespace; this catches one left in the root namespace
        # by a build that failed half-way.
        subprocess.run(["ip", "link", "del", self.a.ifname], capture_output=True, check=False)

    def exists(self) -> bool:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        names = {line.split()[0] for line in out.splitlines() if line.strip()}
        return bool(names & {self.a.netns, self.b.netns})

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()


_PROCESS = re.compile(r'users:\(\("([^"]+)",pid=(\d+)')


def _split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    mapped = re.fullmatch(r"\[::ffff:([\d.]+)\]", host)  # an IPv4 address on a v6 socket
    return (mapped.group(1) if mapped else host), int(port)


def _listener(line: str) -> Listener:
    # State Recv-Q Send-Q Local Peer [Process]
    fields = line.split()
    host, port = _split_address(fields[3])
    match = _PROCESS.search(line)
    return Listener(
        host, port, match.group(1) if match else "?", int(match.group(2)) if match else None
    )


def _connection(line: str) -> Connection:
    # Recv-Q Send-Q Local Peer [Process]  (no State column with a state filter)
    fields = line.split()
    match = _PROCESS.search(line)
    return Connection(
        _split_address(fields[2]),
        _split_address(fields[3]),
        int(match.group(2)) if match else None,
    )
