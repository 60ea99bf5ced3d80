"""The two-node test's namespace helper: `ss` parsing and the not-root failure."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from tests.integration import netns
from tests.integration.netns import ROOT_HINT, Connection, Listener, TwoHosts


def test_listeners_parse_v4_v6_mapped_and_wildcards() -> None:
    lines = [
        'LISTEN 0 4096 198.18.0.1:36979 0.0.0.0:* users:(("ray::ServeRepli",pid=7210,fd=94))',
        'LISTEN 0 4096 [::ffff:198.18.0.1]:39287 *:* users:(("ray::ServeRepli",pid=7264,fd=67))',
        'LISTEN 0 4096 *:6379 *:* users:(("gcs_server",pid=25813,fd=44))',
        'LISTEN 0 5 0.0.0.0:44217 0.0.0.0:* users:(("python3",pid=25847,fd=21))',
        "LISTEN 0 128 127.0.0.1:6380 0.0.0.0:*",
    ]
    parsed = [netns._listener(line) for line in lines]
    assert parsed == [
        Listener("198.18.0.1", 36979, "ray::ServeRepli", 7210),
        Listener("198.18.0.1", 39287, "ray::ServeRepli", 7264),
        Listener("*", 6379, "gcs_server", 25813),
        Listener("0.0.0.0", 44217, "python3", 25847),
        Listener("127.0.0.1", 6380, "?", None),
    ]
    assert [p.wildcard for p in parsed] == [False, False, True, True, False]


def test_connections_parse_local_and_peer() -> None:
    line = '0 0 [::ffff:198.18.0.2]:33938 [::ffff:198.18.0.1]:6379 users:(("raylet",pid=3,fd=11))'
    assert netns._connection(line) == Connection(("198.18.0.2", 33938), ("198.18.0.1", 6379), 3)


def test_no_namespaces_is_a_clear_error_and_leaves_nothing(monkeypatch: Any) -> None:
    calls: list[list[str]] = []

    def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        if argv[:3] == ["ip", "netns", "add"] and kwargs.get("check"):
            raise subprocess.CalledProcessError(
                2, argv, "", "mount --make-shared: Permission denied"
            )
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(netns.subprocess, "run", run)
    with pytest.raises(RuntimeError) as caught:
        TwoHosts.create()
    assert ROOT_HINT in str(caught.value) and "Permission denied" in str(caught.value)
    # It cleaned up after itself: both namespaces and the veth were asked to go.
    deleted = [
        c for c in calls if c[:3] == ["ip", "netns", "del"] or c[:3] == ["ip", "link", "del"]
    ]
    assert len(deleted) == 3, calls


def test_host_names_fit_linux_interface_names() -> None:
    hosts = TwoHosts("pdn" + "f" * 6)
    assert len(hosts.a.ifname) <= 15 and len(hosts.b.ifname) <= 15  # IFNAMSIZ - 1
    assert (hosts.a.ip, hosts.b.ip) == ("198.18.0.1", "198.18.0.2")
    assert hosts.a.command(["ss"]) == ["ip", "netns", "exec", hosts.a.netns, "ss"]
