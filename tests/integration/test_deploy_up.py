"""`pdserve up` as a user runs it: a subprocess that serves gRPC until Ctrl-C.

Local Ray on 127.0.0.1, the private redis-server `pdserve up` starts, the real model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.grpc_server import wait_healthy
from tests.integration.deploy_helpers import (
    generate,
    load_default,
    process_tree,
    small_workers,
    survivors,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PDSERVE = Path(sys.executable).with_name("pdserve")


class UpProcess:
    def __init__(self, proc: subprocess.Popen[bytes], out: Path, log: Path) -> None:
        self.proc = proc
        self.out = out
        self.log = log
        self.endpoint = ""
        self.ray_address = ""
        self.tree: dict[int, str] = {}  # its process tree once ready (for the teardown)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"pdserve up exited {self.proc.returncode}:\n{self.stderr()}")
            for line in self.out.read_text().splitlines():
                if line.startswith("serving gRPC on "):
                    self.endpoint = line.removeprefix("serving gRPC on ").strip()
            if self.endpoint:
                self.tree = process_tree(self.proc.pid)
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"pdserve up not ready after {timeout_s}s:\n{self.stderr()}")
        for line in self.stderr().splitlines():
            if line.startswith("pdserve up: ray "):
                self.ray_address = line.split()[3]

    def stderr(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture
def up(tmp_path: Path) -> Iterator[UpProcess]:
    data = load_default()
    small_workers(data)
    config = write_config(data, tmp_path / "serve.yaml")
    out, log = tmp_path / "up.out", tmp_path / "up.err"
    with out.open("wb") as stdout, log.open("wb") as stderr:
        proc = subprocess.Popen(
            [str(PDSERVE), "up", "--config", str(config), "--port", "0"],
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,  # its own process group: a terminal's Ctrl-C target
        )
    handle = UpProcess(proc, out, log)
    try:
        yield handle
    finally:
        if proc.poll() is None:  # the test failed before its own Ctrl-C
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Never leave our Ray node or Redis behind: kill what is left of *its* tree.
        for line in survivors(handle.tree):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


def test_up_serves_then_ctrl_c_leaves_nothing_behind(up: UpProcess) -> None:
    up.wait_ready(timeout_s=180)
    host, _, port = up.endpoint.rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0, up.endpoint
    wait_healthy(up.endpoint, timeout_s=10)

    reply = generate(up.endpoint, "What is the capital of France?", 12, chat=True)
    assert reply.finish_reason in ("stop", "length")
    assert reply.text.strip()
    assert reply.route is not None and reply.route.prefill_worker.startswith("prefill-")

    chat = subprocess.run(
        [str(PDSERVE), "chat", "Name a colour.", "--address", up.endpoint, "--max-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip(), chat.stderr

    status = subprocess.run(
        [str(PDSERVE), "status", "--address", up.ray_address],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    for expected in ("PrefillWorker", "DecodeWorker", "Router", "prefill-", "decode-", "TTFT"):
        assert expected in status.stdout, status.stdout

    tree = up.tree = process_tree(up.proc.pid)
    names = " ".join(Path(f"/proc/{pid}/comm").read_text().strip() for pid in tree)
    for expected in ("raylet", "gcs_server", "redis-server"):
        assert expected in names, names

    os.killpg(up.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert up.proc.wait(timeout=120) == 0, up.stderr()
    deadline = time.monotonic() + 30
    while survivors(tree) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert survivors(tree) == [], up.stderr()
