"""Units of the load generator: workloads, driver, summaries, oracle, SSE parsing, report.

The driver is exercised against a scripted in-process target here; the real targets (the
router over gRPC, `transformers serve` over HTTP) are in tests/integration/test_loadgen.py.
"""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from loadgen.driver import LoadSpec, RunRecords, drive, poisson_arrivals
from loadgen.oracle import best_hits
from loadgen.record import ChatRequest, RequestRecord
from loadgen.report import disagg_table, markdown, write_report
from loadgen.stack import DISAGG_CONFIGS
from loadgen.suite import disagg_goals
from loadgen.summary import Slo, distribution, hit_ratio, summarize
from loadgen.targets import OpenAITarget, _read_event, open_target
from loadgen.workload import WORKLOAD_KINDS, Session, TextFactory, Turn, WorkloadSpec
from loadgen.workload import build as build_workload
from router.tokenizer import ModelTokenizer


@pytest.fixture(scope="module")
def tokenizer() -> ModelTokenizer:
    return ModelTokenizer.load(None)


@pytest.fixture(scope="module")
def text(tokenizer: ModelTokenizer) -> TextFactory:
    return TextFactory(tokenizer.encode, tokenizer.decode)


# --------------------------------------------------------------------------- workloads


@pytest.mark.parametrize("kind", WORKLOAD_KINDS)
def test_workloads_are_seeded_and_sized(kind: str, text: TextFactory) -> None:
    spec = WorkloadSpec(kind=kind, num_requests=7, groups=2, prompts_per_group=3,
                        conversations=2, turns=3, prefix_tokens=64, long_tokens=200)  # fmt: skip
    first, again = build_workload(spec, text), build_workload(spec, text)
    assert first == again
    assert sum(s.num_requests for s in first) == spec.total_requests
    other = build_workload(spec.with_overrides(seed=1), text)
    assert [s.turns for s in other] != [s.turns for s in first]


def test_text_has_the_requested_token_count(text: TextFactory, tokenizer: ModelTokenizer) -> None:
    rng = random.Random(0)
    for n in (8, 100, 700):
        assert abs(len(tokenizer.encode(text.text(n, rng))) - n) <= 2


def test_shared_prefix_groups_share_their_system_prompt(text: TextFactory) -> None:
    spec = WorkloadSpec(kind="shared_prefix", groups=3, prompts_per_group=4, prefix_tokens=64)
    sessions = build_workload(spec, text)
    by_group: dict[str, set[str]] = {}
    for s in sessions:
        by_group.setdefault(s.group, set()).add(s.system)
    assert len(by_group) == 3 and all(len(systems) == 1 for systems in by_group.values())
    assert len({next(iter(v)) for v in by_group.values()}) == 3
    assert [s.group for s in sessions] != sorted(s.group for s in sessions)  # interleaved


def test_multi_turn_messages_extend_the_conversation() -> None:
    session = Session("c0", (Turn("a", 4, 1), Turn("b", 4, 1), Turn("c", 4, 1)), system="sys")
    assert session.messages(0, []) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "a"},
    ]
    third = session.messages(2, ["ra", "rb"])
    assert [m["content"] for m in third] == ["sys", "a", "ra", "b", "rb", "c"]
    assert [m["role"] for m in third] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    with pytest.raises(ValueError):
        session.messages(2, ["only one reply"])


def test_mixed_long_puts_long_prompts_among_short_ones(text: TextFactory) -> None:
    spec = WorkloadSpec(kind="mixed_long", num_requests=12, long_every=4, long_tokens=300)
    groups = [s.group for s in build_workload(spec, text)]
    assert groups.count("long") == 3 and groups[0] == "short"


def test_bad_workload_values_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        WorkloadSpec(kind="nope")
    with pytest.raises(ValueError, match="turns"):
        WorkloadSpec(kind="multi_turn", turns=0)


# --------------------------------------------------------------------------- driver


class ScriptedTarget:
    """Answers every request with ``tokens`` chunks ``gap_s`` apart; fails listed ids."""

    name = "scripted"

    def __init__(self, tokens: int = 3, gap_s: float = 0.01, fail: frozenset[str] = frozenset()):
        self.tokens, self.gap_s, self.fail = tokens, gap_s, fail
        self.seen: list[ChatRequest] = []
        self.in_flight = self.peak = 0

    async def send(self, request, record, clock, timeout_s):  # type: ignore[no-untyped-def]
        self.seen.append(request)
        record.sent_s = clock()
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if request.request_id in self.fail:
                record.error = "UNAVAILABLE"
                return
            for _ in range(self.tokens):
                await asyncio.sleep(self.gap_s)
                record.add_chunk(clock(), 1)
            record.output_tokens = self.tokens
            record.reply = f"reply to {request.request_id}"
        finally:
            self.in_flight -= 1
            record.end_s = clock()

    async def close(self) -> None:
        pass


def _sessions(n: int, turns: int = 1) -> list[Session]:
    return [Session(f"s{i}", tuple(Turn(f"u{t}", 3, 1) for t in range(turns))) for i in range(n)]


def test_closed_loop_keeps_concurrency_and_sends_everything() -> None:
    target = ScriptedTarget()
    run = asyncio.run(drive(target, _sessions(10), LoadSpec(concurrency=3, progress=False)))
    assert len(run.records) == 10 and all(r.ok for r in run.records)
    assert target.peak == 3
    assert all(len(r.itls_s) == 2 for r in run.records)


def test_open_loop_follows_the_seeded_poisson_schedule() -> None:
    target = ScriptedTarget(tokens=1, gap_s=0.0)
    load = LoadSpec(mode="open", rate=50.0, seed=7, progress=False)
    run = asyncio.run(drive(target, _sessions(20), load))
    expected = poisson_arrivals(20, 50.0, 7)
    assert expected == poisson_arrivals(20, 50.0, 7) != poisson_arrivals(20, 50.0, 8)
    scheduled = sorted(r.scheduled_s for r in run.records)
    assert scheduled == pytest.approx(sorted(expected))
    assert all(r.sent_s >= r.scheduled_s - 1e-6 for r in run.records)
    assert max(r.queue_delay_s for r in run.records) < 0.5


def test_multi_turn_replays_each_reply_and_stops_after_a_failure() -> None:
    target = ScriptedTarget(fail=frozenset({"s1-t1"}))
    run = asyncio.run(drive(target, _sessions(2, turns=3), LoadSpec(progress=False)))
    third = next(r for r in target.seen if r.request_id == "s0-t2")
    assert [m["content"] for m in third.messages] == [
        "u0", "reply to s0-t0", "u1", "reply to s0-t1", "u2"
    ]  # fmt: skip
    assert sorted(r.request_id for r in target.seen) == [
        "s0-t0",
        "s0-t1",
        "s0-t2",
        "s1-t0",
        "s1-t1",
    ]
    assert run.unsent == 1
    assert [r.error for r in run.records if not r.ok] == ["UNAVAILABLE"]


def test_run_is_bounded_in_time() -> None:
    target = ScriptedTarget(tokens=1000, gap_s=0.01)  # 10 s per request
    load = LoadSpec(concurrency=2, max_duration_s=0.1, drain_s=0.3, progress=False)
    run = asyncio.run(drive(target, _sessions(5), load))
    assert {r.error for r in run.records} == {"CANCELLED"}
    assert len(run.records) == 2 and run.unsent == 3


def test_bad_load_values_are_refused() -> None:
    with pytest.raises(ValueError):
        LoadSpec(mode="open", rate=0.0)
    with pytest.raises(ValueError):
        LoadSpec(mode="sideways")
    with pytest.raises(ValueError):
        open_target("tcp://x:1")


# --------------------------------------------------------------------------- summaries


def _record(sent: float, chunks: list[float], cached: int | None = 0, prompt: int = 100,
            error: str = "") -> RequestRecord:  # fmt: skip
    record = RequestRecord("s", 0, "", scheduled_s=sent, sent_s=sent, end_s=chunks[-1] + 0.001,
                           prompt_tokens=prompt, cached_tokens=cached, error=error)  # fmt: skip
    for t in chunks:
        record.add_chunk(t, 1)
    record.output_tokens = len(chunks)
    return record


def test_record_latencies() -> None:
    r = _record(1.0, [1.5, 1.6, 1.8, 2.1])
    assert r.ttft_s == pytest.approx(0.5)
    assert r.itls_s == pytest.approx([0.1, 0.2, 0.3])
    assert r.tpot_s == pytest.approx(0.2)
    assert r.e2e_s == pytest.approx(1.101)


def test_distribution_percentiles() -> None:
    d = distribution([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert d["n"] == 100 and d["p50"] == pytest.approx(50.5) and d["max"] == pytest.approx(100)
    assert d["p99"] == pytest.approx(99.01) and d["mean"] == pytest.approx(50.5)
    assert distribution([])["p50"] is None


def test_goodput_counts_only_requests_within_every_slo() -> None:
    records = [
        _record(0.0, [0.1, 0.2, 0.3]),  # good
        _record(0.0, [3.0, 3.1, 3.2]),  # TTFT 3 s: bad
        _record(0.0, [0.1, 0.9, 1.7]),  # TPOT 800 ms: bad
        _record(0.0, [0.1, 0.15, 0.5]),  # one gap of 350 ms: bad only under max_itl 300
        _record(0.0, [0.1], error="UNAVAILABLE"),
    ]
    loose = summarize(records, duration_s=2.0, slo=Slo(ttft_ms=1000, tpot_ms=300))
    assert loose["completed"] == 4 and loose["failed"] == 1
    assert loose["errors"] == {"UNAVAILABLE": 1}
    assert loose["goodput_req_s"] == pytest.approx(1.0)  # 2 good in 2 s
    assert loose["slo_attainment"] == pytest.approx(0.4)
    tight = summarize(records, 2.0, Slo(ttft_ms=1000, tpot_ms=300, max_itl_ms=300))
    assert tight["goodput_req_s"] == pytest.approx(0.5)
    # prompts of 100 tokens: +20 s per 1k tokens allows 3 s TTFT, so the slow starter is good
    scaled = summarize(records, 2.0, Slo(ttft_ms=1000, tpot_ms=300, ttft_ms_per_1k_tokens=20_000))
    assert scaled["goodput_req_s"] == pytest.approx(1.5)
    assert loose["throughput_req_s"] == pytest.approx(2.0)


def test_summary_splits_groups_and_counts_stalls() -> None:
    short = _record(0.0, [0.2, 0.3, 0.9, 3.1])  # gaps 0.1, 0.6 (a stall), 2.2 (a long one)
    short.group = "short"
    long = _record(0.5, [2.5, 2.6])
    long.group = "long"
    long.scheduled_s = 0.25  # sent 250 ms late
    long.chunk_tokens[1] = 3  # one chunk carried three tokens
    summary = summarize([short, long], 3.2, Slo())
    assert summary["itl_gaps_over"] == {">500ms": 2, ">2000ms": 1}
    assert summary["coalesced_chunks"] == 1
    assert summary["send_lag_ms"]["max"] == pytest.approx(250.0)
    assert summary["groups"].keys() == {"long", "short"}
    assert summary["groups"]["long"]["ttft_ms"]["p50"] == pytest.approx(2000.0)
    assert summary["groups"]["short"]["itl_ms"]["n"] == 3


def test_hit_ratio_uses_only_reported_usage() -> None:
    records = [_record(0, [1], cached=50), _record(0, [1], cached=0), _record(0, [1], cached=None)]
    assert hit_ratio(records) == pytest.approx(0.25)
    assert hit_ratio([_record(0, [1], cached=None)]) is None


def test_oracle_counts_full_blocks_of_earlier_prompts() -> None:
    system = list(range(100, 164))  # 64 tokens = 4 blocks of 16
    a, b = system + [1] * 10, system + [2] * 10
    result = best_hits([a, b, list(a)], block_size=16)
    # a: nothing before it; b: 4 shared blocks; a again: all 5 full blocks but the last
    # token must be computed, so (74 - 1) // 16 = 4 blocks
    assert result.cached_tokens == 64 + 64
    assert result.ratio == pytest.approx(128 / (74 * 3))
    assert best_hits([system[:16], system[:16]], 16).cached_tokens == 0  # 1 token left to do


# --------------------------------------------------------------------------- OpenAI SSE


def _events(*chunks: dict) -> list[bytes]:
    return [f"data: {json.dumps(c)}\n".encode() for c in chunks] + [b"\n", b"data: [DONE]\n"]


def test_sse_events_fill_the_record() -> None:
    record = RequestRecord("s", 0, "", 0.0)
    parts: list[str] = []
    times = iter([0.5, 0.6, 0.7])
    for line in _events(
        {"choices": [{"delta": {"role": "assistant"}}]},
        {"choices": [{"delta": {"content": "Hel"}}]},
        {"choices": [{"delta": {"content": "lo"}}]},
        {"choices": [{"delta": {}, "finish_reason": "length"}],
         "usage": {"prompt_tokens": 30, "completion_tokens": 2,
                   "prompt_tokens_details": {"cached_tokens": 16}}},
    ):  # fmt: skip
        _read_event(line, record, parts, lambda: next(times))
    assert "".join(parts) == "Hello" and record.chunk_times == [0.5, 0.6]
    assert record.finish_reason == "length"
    assert (record.prompt_tokens, record.output_tokens, record.cached_tokens) == (30, 2, 16)


def test_openai_target_against_a_local_sse_server() -> None:
    """The HTTP client end to end against a scripted aiohttp server on 127.0.0.1."""
    from aiohttp import web

    bodies: list[dict] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.json())
        if bodies[-1]["max_tokens"] == 13:
            return web.Response(status=503)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for line in _events(
            {"choices": [{"delta": {"content": "a"}}]},
            {"choices": [{"delta": {"content": "b"}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 9, "completion_tokens": 2}},
        ):  # fmt: skip
            await response.write(line)
            await asyncio.sleep(0.01)
        return response

    async def scenario() -> tuple[RequestRecord, RequestRecord]:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        target = open_target(f"http://127.0.0.1:{port}", model="m")
        assert isinstance(target, OpenAITarget)
        good, bad = RequestRecord("s", 0, "", 0.0), RequestRecord("s", 1, "", 0.0)
        messages = [{"role": "user", "content": "hi"}]
        try:
            await target.send(ChatRequest("r1", messages, 8), good, lambda: 0.0, 10.0)
            await target.send(ChatRequest("r2", messages, 13), bad, lambda: 0.0, 10.0)
        finally:
            await target.close()
            await runner.cleanup()
        return good, bad

    good, bad = asyncio.run(scenario())
    assert good.ok and good.reply == "ab" and good.output_tokens == 2
    assert good.cached_tokens is None  # not reported: excluded from the hit ratio
    assert bodies[0]["stream"] is True and bodies[0]["model"] == "m"
    assert bodies[0]["messages"] == [{"role": "user", "content": "hi"}]
    assert bad.error == "HTTP_503" and not bad.ok


# --------------------------------------------------------------------------- report


def _result(label: str, kind: str, rate: float) -> dict:
    records = [_record(0.0, [0.2, 0.3, 0.5], cached=32), _record(0.1, [0.4, 0.45, 0.6])]
    run = RunRecords(records=records, duration_s=1.0)
    summary = summarize(run.records, run.duration_s, Slo())
    summary.update(oracle_hit_ratio=0.3, hit_of_best=summary["hit_ratio"] / 0.3)
    return {
        "label": label, "target": "grpc://x", "rate": rate,
        "workload": {"kind": kind}, "load": {"mode": "open", "rate": rate, "concurrency": 1},
        "summary": summary, "records": [r.to_json() for r in records],
    }  # fmt: skip


def test_report_writes_markdown_json_and_plots(tmp_path) -> None:  # type: ignore[no-untyped-def]
    results = {
        "environment": {"cpu_count": 2},
        "scenarios": {
            "disagg": {"runs": [_result("disaggregated", "mixed_long", r) for r in (0.5, 1.0)]
                       + [_result("colocated", "mixed_long", r) for r in (0.5, 1.0)],
                       "goals": {"p99_itl_ratio": 0.4}},
            "routing": {"runs": [_result(p, k, 1.0) for p in ("prefix_aware", "round_robin")
                                 for k in ("shared_prefix", "multi_turn")]},
        },
    }  # fmt: skip
    paths = write_report(results, tmp_path)
    names = {p.name for p in paths}
    assert {"results.json", "report.md", "ttft_cdf_disagg.png", "itl_cdf_routing.png"} <= names
    assert {"goodput_vs_rate.png", "hit_ratio.png"} <= names
    for p in paths:
        assert p.stat().st_size > 0
    assert (tmp_path / "ttft_cdf_routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = markdown(results)
    assert "| disaggregated · mixed_long @ 0.5/s | 2/2 |" in md
    assert "p99_itl_ratio" in md
    assert json.loads((tmp_path / "results.json").read_text())["scenarios"].keys() == {
        "disagg", "routing"
    }  # fmt: skip


def test_disagg_goals_and_side_by_side_table() -> None:
    runs = [_result(label, "mixed_long", rate) for label in ("disaggregated", "colocated",
            "colocated-256") for rate in (0.5, 1.0)]  # fmt: skip
    runs[0]["summary"]["itl_ms"]["p99"] = 100.0  # disaggregated at 0.5/s
    runs[2]["summary"]["itl_ms"]["p99"] = 400.0  # colocated
    runs[4]["summary"]["itl_ms"]["p99"] = 250.0  # colocated-256
    goals = disagg_goals(runs, 0.5)
    assert goals["p99_itl_ratio"] == 0.25 and goals["p99_itl_met"] is True
    assert goals["p99_itl_ratio_vs"] == {"colocated": 0.25, "colocated-256": 0.4}
    assert goals["max_rate_meeting_slo"].keys() == {"disaggregated", "colocated", "colocated-256"}
    table = disagg_table({"runs": runs, "goals": goals})
    assert table[0] == "At 0.5 req/s:"
    assert table[2].startswith("| metric | disaggregated | colocated | colocated-256 |")
    assert "| ITL p99 ms | 100 | 400 | 250 | 0.25 | 0.4 |" in table
    assert disagg_table({"runs": runs[2:], "goals": goals}) == []  # no disaggregated run


def test_disagg_configurations_differ_in_one_setting() -> None:
    specs = {name: build() for name, build in DISAGG_CONFIGS.items()}
    assert {name: spec.name for name, spec in specs.items()} == {n: n for n in specs}
    flags = {name: [" ".join(w.args) for w in spec.workers] for name, spec in specs.items()}
    assert all("--max-num-batched-tokens 1024" in f for f in flags["colocated"])
    assert all("--max-num-batched-tokens 256" in f for f in flags["colocated-256"])
    assert all("--kv-cache-order page_first" in f for f in flags["disaggregated-page-first"])
    assert "--on-prefill-failure fail" in flags["disaggregated"][1]
    assert specs["disaggregated"].conditional is None
    assert specs["disaggregated-conditional"].conditional == {}  # the router's defaults
    assert flags["disaggregated-conditional"] == flags["disaggregated"]
