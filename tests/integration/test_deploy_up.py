"""`pdserve up` as a user runs it: a subprocess that serves gRPC until Ctrl-C.

Local Ray on 127.0.0.1, the private redis-server `pdserve up` starts, the real model;
started from an empty working directory with only PATH and HOME in its environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.grpc_server import wait_healthy
from common.launch import ChildProcess
from common.ready_line import parse_up_http_ready, parse_up_ready
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
        self.http_endpoint = ""
        self.ray_address = ""
        self.tree: dict[int, str] = {}  # its process tree once ready (for the teardown)

    def wait_ready(self, timeout_s: float) -> None:
        try:
            self.endpoint = self.child.wait_for_line(parse_up_ready, timeout_s)
            self.http_endpoint = self.child.wait_for_line(parse_up_http_ready, 10)
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
    # As a new user runs it: from an empty directory, with only PATH and HOME set (no
    # PDSERVE_*, no PYTHONPATH, no offline variables: the CLI sets its own), so the model
    # cache is the default one, ~/.cache/pdserve (converted there if it is not yet).
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    child = ChildProcess(
        [str(PDSERVE), "up", "--config", str(config), "--port", "0", "--http-port", "0"],
        tmp_path / "up.err",
        {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"]},
        cwd=cwd,
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
    with urllib.request.urlopen(f"http://{up.http_endpoint}/v1/models", timeout=10) as models:
        assert json.loads(models.read())["data"], "the HTTP API lists the model"

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
    # The private Redis has a password and the cluster a secret, both files of ours; no
    # password is printed (a URL with one would read redis://:…@127.0.0.1).
    assert "@127.0.0.1" not in status.stdout + up.stderr()
    secrets = sorted(p.name for p in _secrets_dir().glob(f"{up.child.pid}-*"))
    assert secrets == [f"{up.child.pid}-cluster.secret", f"{up.child.pid}-redis.password"]

    tree = up.tree = process_tree(up.child.pid)
    names = " ".join(Path(f"/proc/{pid}/comm").read_text().strip() for pid in tree)
    for expected in ("raylet", "gcs_server", "redis-server"):
        assert expected in names, names

    up.child.signal(signal.SIGINT)  # what Ctrl-C in a terminal does
    assert up.child.wait_exit(120) == 0, up.stderr()
    assert list((up.child.log_path.parent / "cwd").iterdir()) == []  # wrote nothing in cwd
    assert not list(_secrets_dir().glob(f"{up.child.pid}-*"))  # removed on stop
    deadline = time.monotonic() + 30
    while survivors(tree) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert survivors(tree) == [], up.stderr()


def _secrets_dir() -> Path:
    return Path(os.environ["HOME"]) / ".cache" / "pdserve" / "secrets"  # no $PDSERVE_CACHE_DIR
