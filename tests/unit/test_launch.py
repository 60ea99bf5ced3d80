"""common.launch: a child in its own process group, its output, bounded waits, always killed.

Real (tiny) child processes: ``python -c`` scripts that print, sleep or fork.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from common.launch import REPO_ROOT, ChildProcess, child_env, free_loopback_port, wait_until
from common.ready_line import parse_router_ready


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def test_child_env_is_offline_loopback_and_finds_the_repo(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    env = child_env(threads=3, extra={"EXTRA": "1"})
    assert env["HF_HUB_OFFLINE"] == "1" and env["GLOO_SOCKET_IFNAME"] == "lo"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO_ROOT), "/elsewhere"]
    assert env["EXTRA"] == "1"
    assert child_env(threads=None).get("OMP_NUM_THREADS") == os.environ.get("OMP_NUM_THREADS")


def test_ready_line_then_a_line_protocol(tmp_path: Path) -> None:
    code = "import sys; print('noise'); print('ready 42', flush=True)\n" \
           "for line in sys.stdin: print('echo ' + line.strip(), flush=True)"  # fmt: skip
    with ChildProcess(_python(code), tmp_path / "echo.log", stdin=True) as child:
        port = child.wait_for_line(lambda line: line.split()[1] if "ready" in line else None, 10)
        assert port == "42"
        child.write_line("hello")
        assert child.next_line(10) == "echo hello"
    assert not child.alive()


def test_a_child_that_exits_or_stays_silent_fails_the_wait_with_its_log(tmp_path: Path) -> None:
    crash = "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"
    with (
        ChildProcess(_python(crash), tmp_path / "crash.log") as child,
        pytest.raises(RuntimeError, match=r"crash exited \(3\)[\s\S]*boom"),
    ):
        child.wait_for_line(lambda line: line or None, 10)
    with ChildProcess(_python("import time; time.sleep(30)"), tmp_path / "mute.log") as child:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"mute not ready in 0\.5s"):
            child.wait_for_line(lambda line: line, 0.5)
        assert time.monotonic() - started < 5
        with pytest.raises(TimeoutError):
            child.next_line(0.1)


def test_kill_takes_the_whole_process_group(tmp_path: Path) -> None:
    code = "import subprocess, sys, time\n" \
           "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n" \
           "print(p.pid, flush=True); time.sleep(60)"  # fmt: skip
    child = ChildProcess(_python(code), tmp_path / "tree.log")
    grandchild = int(child.wait_for_line(lambda line: line if line.isdigit() else None, 10))
    assert child.pid != os.getpgrp() and os.getpgid(child.pid) == child.pid  # own group
    assert _alive(grandchild)
    child.kill()
    wait_until(lambda: not _alive(grandchild), 10, "the grandchild killed with its group")
    child.kill()  # idempotent


def test_terminate_asks_first_then_kills(tmp_path: Path) -> None:
    polite = "import signal, sys, time\n" \
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n" \
             "print('up', flush=True); time.sleep(60)"  # fmt: skip
    child = ChildProcess(_python(polite), tmp_path / "polite.log")
    child.wait_for_line(lambda line: line or None, 10)
    assert child.terminate(grace_s=10) == 7
    stubborn = "import signal, time\n" \
               "signal.signal(signal.SIGINT, signal.SIG_IGN)\n" \
               "print('up', flush=True); time.sleep(60)"  # fmt: skip
    child = ChildProcess(_python(stubborn), tmp_path / "stubborn.log")
    child.wait_for_line(lambda line: line or None, 10)
    assert child.terminate(signal.SIGINT, grace_s=0.5) == -signal.SIGKILL
    assert not child.alive()


def test_wait_until_and_free_port() -> None:
    calls: list[int] = []
    wait_until(lambda: calls.append(1) or len(calls) >= 3, 5, "three polls", poll_s=0.01)
    assert len(calls) == 3
    with pytest.raises(TimeoutError, match="waiting for never"):
        wait_until(lambda: False, 0.05, "never", poll_s=0.01)
    assert 0 < free_loopback_port() < 65536


def test_router_ready_line() -> None:
    ready = parse_router_ready("router serving gRPC on 127.0.0.1:5 http h:6 metrics - pools a,b")
    assert ready is not None and ready.grpc_address == "127.0.0.1:5"
    assert ready.http_address == "h:6"
    assert ready.metrics_address is None and ready.pools == ("a", "b")
    assert parse_router_ready("prefill worker p serving gRPC on x kv - metrics -") is None
