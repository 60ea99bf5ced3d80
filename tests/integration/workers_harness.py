"""Worker processes for the tests, and thin synchronous gRPC clients to talk to them.

The processes are :class:`common.server_process.WorkerProcess`, the launcher the tests,
the benchmarks and the load generator share: ``python -m prefill_worker`` / ``python -m
decode_worker`` in its own process group, ready line parsed, gRPC health awaited, the
whole group killed on ``kill()``. Every wait is bounded, so a broken worker fails a test
instead of hanging it.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from common import server_process
from common.launch import wait_until
from common.server_process import WorkerProcess, WorkerSpec
from messages.status import WorkerStatus
from messages.status_proto import status_from_proto
from proto import worker_pb2, worker_pb2_grpc

# Small engines, one thread each: several workers and the test share two cores.
# fp32: the worker tests compare tokens with an in-process reference run under other
# batchings, and only fp32 is batch-invariant (bf16, the `auto` default on this CPU, is
# held to fp32 within bounds in tests/integration/test_engine_bf16.py).
SMALL_ENGINE = (
    *("--num-kv-blocks", "256", "--num-threads", "1", "--max-num-seqs", "32"),
    *("--dtype", "float32"),
)


def start_workers(
    specs: Sequence[tuple[str, str, Sequence[str]]], log_dir: Path, timeout_s: float = 120.0
) -> list[WorkerProcess]:
    """Start ``(module, name, args)`` workers together (model loads overlap), then wait."""
    return server_process.start_workers(
        [WorkerSpec(module, name, tuple(args)) for module, name, args in specs], log_dir, timeout_s
    )


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
        prefill=(
            worker_pb2.PrefillTarget(worker_id=prefill.worker_id, grpc_address=prefill.grpc_address)
            if prefill is not None
            else None
        ),
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


def status(channel: grpc.Channel) -> WorkerStatus:
    reply = worker_pb2_grpc.WorkerControlStub(channel).GetStatus(
        worker_pb2.GetStatusRequest(), timeout=10
    )
    return status_from_proto(reply)


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


def wait_idle(channel: grpc.Channel, timeout_s: float = 20.0) -> WorkerStatus:
    """Wait until a worker holds no referenced blocks and runs nothing; its final status."""
    last: list[WorkerStatus] = []

    def idle() -> bool:
        s = status(channel)
        last[:] = [s]
        return s.used_blocks == 0 and s.running == 0 and s.waiting == 0

    try:
        wait_until(idle, timeout_s, "an idle worker")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last status: {last[0] if last else None}") from None
    return last[0]
