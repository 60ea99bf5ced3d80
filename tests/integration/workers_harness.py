"""Worker processes for the tests: start, wait until ready, talk to, and always kill.

:class:`WorkerProcess` runs ``python -m prefill_worker`` / ``python -m decode_worker`` in
its own process group, parses the ready line, waits for gRPC health and kills the whole
group on :meth:`kill`. Every wait is bounded, so a broken worker fails a test instead of
hanging it. The helpers below are thin synchronous gRPC clients.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from common.grpc_server import wait_healthy
from proto import worker_pb2, worker_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
READY = re.compile(r"^(\w+) worker (\S+) serving gRPC on (\S+) kv (\S+) metrics (\S+)$")
# Small engines, one thread each: several workers and the test share two cores.
SMALL_ENGINE = ("--num-kv-blocks", "256", "--num-threads", "1", "--max-num-seqs", "32")


class WorkerProcess:
    def __init__(self, module: str, args: Sequence[str], log_dir: Path, name: str) -> None:
        self.module = module
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
            "PDSERVE_CACHE_DIR": os.environ.get("PDSERVE_CACHE_DIR", str(REPO / ".cache")),
        }
        self._log = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--worker-id", name, *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=REPO,
            env=env,
            start_new_session=True,  # its own process group: kill() takes its children too
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.worker_id = ""
        self.grpc_address = ""
        self.kv_address = ""
        self.metrics_address = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_ready(self, timeout_s: float = 120.0) -> WorkerProcess:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name} not ready in {timeout_s}s:\n{self.log()}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.name} exited ({self.proc.poll()}):\n{self.log()}")
            match = READY.match(line)
            if match:
                _, self.worker_id, self.grpc_address, self.kv_address, self.metrics_address = (
                    match.groups()
                )
                wait_healthy(self.grpc_address, timeout_s=max(deadline - time.monotonic(), 1))
                return self

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def wait_exit(self, timeout_s: float) -> int:
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._log.close()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def target(self) -> worker_pb2.PrefillTarget:
        return worker_pb2.PrefillTarget(worker_id=self.worker_id, grpc_address=self.grpc_address)


def start_workers(
    specs: Sequence[tuple[str, str, Sequence[str]]], log_dir: Path
) -> list[WorkerProcess]:
    """Start ``(module, name, args)`` workers together (model loads overlap), then wait."""
    workers = [WorkerProcess(module, args, log_dir, name) for module, name, args in specs]
    try:
        for worker in workers:
            worker.wait_ready()
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    return workers


# ---- clients ---------------------------------------------------------------------------------


@dataclass
class DecodeResult:
    tokens: list[int] = field(default_factory=list)
    finish_reason: int = 0
    usage: worker_pb2.Usage | None = None
    prefilled_by: str = ""
    messages: int = 0


def greedy(max_tokens: int, ignore_eos: bool = False) -> worker_pb2.SamplingParams:
    return worker_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)


def decode_request(
    request_id: str,
    prompt: Sequence[int],
    sampling: worker_pb2.SamplingParams,
    prefill: WorkerProcess | None = None,
) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(
        request_id=request_id,
        token_ids=list(prompt),
        sampling=sampling,
        prefill=prefill.target() if prefill is not None else None,
    )


def decode(
    channel: grpc.Channel,
    request: worker_pb2.DecodeRequest,
    timeout_s: float = 60.0,
    on_message: Callable[[int], bool] | None = None,
) -> DecodeResult:
    """Run one Decode stream; ``on_message(n)`` returning True cancels it after message n."""
    result = DecodeResult()
    call = worker_pb2_grpc.DecodeWorkerStub(channel).Decode(request, timeout=timeout_s)
    for message in call:
        result.messages += 1
        result.tokens.extend(message.token_ids)
        if message.prefilled_by:
            result.prefilled_by = message.prefilled_by
        if message.finish_reason:
            result.finish_reason = message.finish_reason
            result.usage = message.usage
        if on_message is not None and on_message(result.messages):
            call.cancel()
            break
    return result


def status(channel: grpc.Channel) -> worker_pb2.WorkerStatus:
    return worker_pb2_grpc.WorkerControlStub(channel).GetStatus(
        worker_pb2.GetStatusRequest(), timeout=10
    )


def scrape(worker: WorkerProcess) -> str:
    """The worker's Prometheus exposition text."""
    with urllib.request.urlopen(f"http://{worker.metrics_address}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(worker: WorkerProcess, series: str) -> float:
    """One sample, e.g. ``pdserve_requests_total{outcome="ok"}``; 0 when absent."""
    for line in scrape(worker).splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def wait_idle(channel: grpc.Channel, timeout_s: float = 20.0) -> worker_pb2.WorkerStatus:
    """Wait until a worker holds no referenced blocks and runs nothing; its final status."""
    last: list[worker_pb2.WorkerStatus] = []

    def idle() -> bool:
        s = status(channel)
        last[:] = [s]
        return s.used_blocks == 0 and s.running == 0 and s.waiting == 0

    try:
        wait_until(idle, timeout_s, "an idle worker")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last status: {last[0] if last else None}") from None
    return last[0]
