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
from common.launch import ChildProcess, child_env
from common.ready_line import parse_up_ready
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
    """`pdserve up` as a :class:`ChildProcess` (its own process group: a terminal's
    Ctrl-C target); its stderr is the log."""

    def __init__(self, child: ChildProcess) -> None:
        self.child = child
        self.endpoint = ""
        self.ray_address = ""
        self.tree: dict[int, str] = {}  # its process tree once ready (for the teardown)

    def wait_ready(self, timeout_s: float) -> None:
        try:
            self.endpoint = self.child.wait_for_line(parse_up_ready, timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"pdserve up did not come up: {exc}")
        self.tree = process_tree(self.child.pid)
        for line in self.stderr().splitlines():
            if line.startswith("pdserve up: ray "):
                self.ray_address = line.split()[3]

    def stderr(self) -> str:
        return self.child.log_tail(chars=None)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[UpProcess]:
    data = load_default()
    small_workers(data)
    config = write_config(data, tmp_path / "serve.yaml")
    child = ChildProcess(
        [str(PDSERVE), "up", "--config", str(config), "--port", "0"],
        tmp_path / "up.err",
        child_env(threads=None),
    )
    handle = UpProcess(child)
    try:
        yield handle
    finally:
        child.terminate(signal.SIGINT, grace_s=90)  # if the test failed before its Ctrl-C
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

    tree = up.tree = process_tree(up.child.pid)
    names = " ".join(Path(f"/proc/{pid}/comm").read_text().strip() for pid in tree)
    for expected in ("raylet", "gcs_server", "redis-server"):
        assert expected in names, names

    up.child.signal(signal.SIGINT)  # what Ctrl-C in a terminal does
    assert up.child.wait_exit(120) == 0, up.stderr()
    deadline = time.monotonic() + 30
    while survivors(tree) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert survivors(tree) == [], up.stderr()
