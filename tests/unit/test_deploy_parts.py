"""The deploy package's small parts: latency quantiles, the loop host, status tables."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from prometheus_client import CollectorRegistry, Histogram

from common.worker_info import BlockGeometry, WorkerInfo, WorkerLoad, WorkerRole
from deploy.hosting import LoopThread
from deploy.latency import RecentQuantile, bucket_quantile
from deploy.replica_stats import ReplicaStats
from deploy.status import DeploymentRow, StatusReport, WorkerRow, render

# ---- quantiles -------------------------------------------------------------------------------


def test_bucket_quantile_interpolates_like_promql() -> None:
    bounds = [0.1, 0.5, 1.0, float("inf")]
    # 10 samples: 2 <= 0.1, 6 in (0.1, 0.5], 2 in (0.5, 1.0]
    cumulative = [2, 8, 10, 10]
    assert bucket_quantile(0.5, bounds, cumulative) == pytest.approx(0.1 + 0.4 * 3 / 6)
    assert bucket_quantile(0.9, bounds, cumulative) == pytest.approx(0.5 + 0.5 * 1 / 2)
    assert bucket_quantile(0.1, bounds, cumulative) == pytest.approx(0.05)


def test_bucket_quantile_edges() -> None:
    assert bucket_quantile(0.9, [1.0, float("inf")], [0, 0]) is None
    assert bucket_quantile(0.9, [1.0, float("inf")], [0, 5]) == 1.0  # +Inf: largest bound
    with pytest.raises(ValueError):
        bucket_quantile(1.5, [1.0], [1])


def test_recent_quantile_forgets_old_samples() -> None:
    h = Histogram("h", "test", buckets=(0.1, 1.0, 10.0), registry=CollectorRegistry())
    recent = RecentQuantile(h, window_s=10.0)
    for _ in range(10):
        h.observe(5.0)  # slow, long ago
    assert recent.quantile(0.9, now=0.0) == pytest.approx(9.1)
    for _ in range(10):
        h.observe(0.05)  # fast, now
    assert recent.quantile(0.9, now=5.0) == pytest.approx(0.09)  # only the new ones
    assert recent.quantile(0.9, now=20.0) is None  # nothing in the last 10 s


# ---- the loop host ---------------------------------------------------------------------------


def test_loop_thread_runs_a_server_until_told_to_stop() -> None:
    stop = asyncio.Event()
    seen: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)  # a no-op off the main thread
        seen.append("started")
        await stop.wait()
        seen.append("stopped")

    host = LoopThread("test")
    host.start(main)
    assert host.run(asyncio.sleep(0, result=42), timeout_s=5) == 42
    assert host.running and seen == ["started"]
    host.call_soon(stop.set)
    assert host.join(timeout_s=5)
    assert seen == ["started", "stopped"] and host.error is None and not host.running
    host.call_soon(stop.set)  # after the loop closed: ignored


def test_loop_thread_reports_the_error_main_raised() -> None:
    async def main() -> None:
        raise RuntimeError("model failed to load")

    host = LoopThread("test")
    host.start(main)
    assert asyncio.run(host.wait(timeout_s=5))
    assert isinstance(host.error, RuntimeError)


# ---- status ----------------------------------------------------------------------------------


def _info(worker_id: str, role: WorkerRole) -> WorkerInfo:
    geometry = BlockGeometry("m", "float32", 16, 30, 3, 64, 256)
    return WorkerInfo(worker_id, role, "default", "m", "127.0.0.1:1", None, geometry)


def test_status_table_shows_pools_replicas_and_load() -> None:
    report = StatusReport(
        app="pdserve",
        app_status="RUNNING",
        ray_address="127.0.0.1:6379",
        redis_url="redis://127.0.0.1:1/0",
        deployments=[
            DeploymentRow(
                "PrefillWorker", "UPSCALING", 1, 2, {"RUNNING": 1, "STARTING": 1}, "1..2", ("abc",)
            ),
            DeploymentRow("Router", "HEALTHY", 1, 1, {"RUNNING": 1}, "", ("r",)),
        ],
        workers=[
            WorkerRow(
                _info("prefill-abc", WorkerRole.PREFILL),
                WorkerLoad("prefill-abc", 3, 1, 200, 56, 10, queued_prefill_tokens=2000),
                ReplicaStats(
                    "prefill-abc",
                    "PrefillWorker",
                    "abc",
                    "prefill",
                    "default",
                    "127.0.0.1:1",
                    1,
                    0.219,
                    0.5,
                    812.0,
                    None,
                ),
                "abc",
            ),
            WorkerRow(_info("decode-x", WorkerRole.DECODE), None, None, ""),
        ],
    )
    text = render(report)
    lines = text.splitlines()
    assert lines[0].startswith("app pdserve: RUNNING")
    assert any("PrefillWorker" in line and "UPSCALING" in line and "1..2" in line for line in lines)
    row = next(line for line in lines if line.startswith("default  prefill"))
    for cell in ("prefill-abc", "abc", "21.9%", "50.0%", "812 ms", "serving"):
        assert cell in row
    assert "decode-x" in text  # a worker without load or replica still shows


def test_replica_stats_round_trip() -> None:
    stats = ReplicaStats("d-1", "DecodeWorker", "1", "decode", "p", "h:1", 7, 0.5, None, None, 3.0)
    assert ReplicaStats.from_json(stats.to_json()) == stats
    assert time.time() - stats.updated_at < 60


def test_status_table_shows_the_queue_time_p90() -> None:
    stats = ReplicaStats(
        "decode-x", "DecodeWorker", "x", "decode", "default", "127.0.0.1:1", 1, 0.5, None,
        40.0, 60.0, queue_time_p90_ms=1234.0,
    )  # fmt: skip
    report = StatusReport(
        app="pdserve",
        app_status="RUNNING",
        ray_address="127.0.0.1:6379",
        redis_url="redis://127.0.0.1:1/0",
        deployments=[],
        workers=[WorkerRow(_info("decode-x", WorkerRole.DECODE), None, stats, "x")],
    )
    lines = render(report).splitlines()
    assert "QUEUE p90" in next(line for line in lines if line.startswith("POOL"))
    assert "1234 ms" in next(line for line in lines if "decode-x" in line)
    assert ReplicaStats.from_json(stats.to_json()).queue_time_p90_ms == 1234.0
