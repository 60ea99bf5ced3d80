"""Disaggregated vs colocated serving on two CPU cores: TTFT, ITL and throughput.

The question: does disaggregation keep long prefills from stalling running decodes?

Configurations (every worker gets ``--num-threads 1``, so each pair uses two cores):

* ``disaggregated``  1 prefill worker + 1 decode worker. The client sends every request to
  the decode worker and names the prefill worker (``DecodeRequest.prefill``); prompts are
  prefilled there and their KV is sent to the decode worker, which only decodes.
  The decode worker runs with ``--on-prefill-failure fail`` so a prefill that fails shows
  up as an error instead of being silently prefilled on the decode worker.
* ``colocated``      2 colocated workers (``decode_worker --colocated``), each prefilling
  and decoding its own requests with the engine's default chunked-prefill budget
  (``--max-num-batched-tokens 1024``). The client picks, per request, the worker with the
  fewest outstanding tokens (the prompt until its first token arrives, plus the output
  not yet received), ties round-robin — a load-aware router, the baseline's best case;
  ``--colocated-routing least-requests | round-robin`` for the simpler ones.
* ``colocated-256``  the same with a 256-token per-step budget: smaller prefill chunks are
  colocated serving's own mitigation, so the baseline gets its best shot too. Extra row;
  the goal is judged against ``colocated`` (the default setting) and the ratio against
  this row is reported next to it.
* ``disaggregated-page-first``  opt-in (``--configs``): ``disaggregated`` with both
  workers' KV caches page-first (``--kv-cache-order page_first``) instead of the default
  layer-first; its layer-wise KV sends stage every block.

Workload (seeded, the identical arrival schedule for every configuration), open loop:

* short, chat-like requests: Poisson arrivals at ``--rate`` req/s, prompts of 64–128
  tokens, 64–128 output tokens;
* long prompts of 1000–2000 tokens with 16 output tokens, one per ``--long-every``
  seconds on average (evenly spaced, jittered, so every run gets the same count).

Sizing (one torch thread, CPU time measured on the 2-core box): a 1024-token prefill
takes ~3.7 s, 2000 tokens ~8.4 s; a decode step ~60 ms at batch 1, ~110 ms at batch 8.
The defaults (0.5 short req/s, a long prompt every 12 s) keep the lone prefill core of
the disaggregated pair about 60% busy and its decode worker at a batch of ~5, so neither
configuration is overloaded on an idle machine and the comparison is about interference,
not queueing. Higher rates overload the single prefill worker first.

Prompts are random ordinary token ids (no special tokens), so nothing hits a prefix cache;
sampling is greedy with ``ignore_eos`` so every request produces exactly its
``max_tokens``. Sending stops at ``--duration`` seconds or ``--max-requests``; then the
client waits (bounded) for the requests in flight. Each configuration is warmed up first
(short and medium prompts on every worker, which also opens the prefill→decode KV pair).

Measured at the client, per configuration:

* TTFT  send → first streamed token, short and long requests separately;
* ITL   every gap between consecutive streamed messages of the short requests — the
  decodes a long prefill can stall. Each message normally carries one engine step's
  token; messages carrying several tokens are counted and reported (``coalesced``);
* E2E   send → last token of the short requests; throughput = output tokens of all
  requests / (last token − first send).

The table puts the configurations side by side with ratios ``disagg / colocated`` (< 1 is
better for disaggregation). Goal (issue 4): p99 ITL of the disaggregated pair <= 0.5x the
colocated pair's at the same request rate — PASS / MISS. The JSON
(``benchmarks/results/disagg_vs_colocated.json``, ``_quick`` suffix with ``--quick``) has
the plan, every worker's flags, the summaries, request errors, client send lag (how late
the client sent vs the schedule: large values mean the client itself was starved), each
worker's status once idle (leak check), and the load average before and after each run.

On a shared machine timings are noisy; the script warns when the load average is high.

Run: ``python benchmarks/disagg_vs_colocated.py [--quick] [--rate R] [--long-every S]
[--duration S] [--max-requests N] [--seed N] [--configs disaggregated,colocated,
colocated-256] [--colocated-routing least-tokens] [--out PATH] [--log-dir DIR]
[--keep-logs]``. Full: 3 configurations, ~5–6 min on 2 idle cores; ``--quick``: 16 s of
arrivals, disaggregated and colocated only, ~1.5 min. Worker logs go to a temp dir that
is removed unless the run fails or ``--keep-logs``. Exit status 1 if a configuration had
failed requests or a dead worker.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

from benchmarks._cluster import LocalCluster, WorkerSpec, exit_on_signals, log_directory
from benchmarks._common import (
    busy_machine_warning,
    environment_info,
    percentile,
    print_table,
    write_json,
)
from proto import worker_pb2, worker_pb2_grpc

VOCAB_SIZE = 49152  # SmolLM2; ids 0..16 are special tokens
FIRST_ORDINARY_TOKEN = 17
NUM_KV_BLOCKS = 1024  # per worker: 16k tokens, room for a few long prompts + the short ones
GOAL_ITL_P99_RATIO = 0.5
BASELINE = "colocated"
CONFIGS = ("disaggregated", "colocated", "colocated-256", "disaggregated-page-first")
DEFAULT_CONFIGS = CONFIGS[:3]
STALL_THRESHOLDS_S = (0.5, 2.0)  # ITL gaps longer than these are counted as stalls


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class Plan:
    """Sizes of one run; ``quick`` shrinks it to a smoke test of the whole harness."""

    duration_s: float = 72.0  # arrivals are scheduled in [0, duration)
    rate: float = 0.5  # short requests per second (Poisson)
    short_prompt: tuple[int, int] = (64, 128)
    short_output: tuple[int, int] = (64, 128)
    long_every_s: float = 12.0  # mean gap between long prompts
    long_prompt: tuple[int, int] = (1000, 2000)
    long_output: int = 16
    max_requests: int = 500
    drain_timeout_s: float = 90.0  # after the last arrival, for the requests in flight
    request_timeout_s: float = 240.0
    seed: int = 0

    @classmethod
    def quick(cls) -> Plan:
        return cls(duration_s=16.0, long_every_s=8.0, drain_timeout_s=45.0)


@dataclass(frozen=True, slots=True)
class Arrival:
    index: int
    at_s: float  # offset from the start of sending
    kind: str  # "short" | "long"
    prompt: tuple[int, ...]
    max_tokens: int


def build_schedule(plan: Plan, seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    times: list[tuple[float, str]] = []
    t = rng.expovariate(plan.rate)
    while t < plan.duration_s:
        times.append((t, "short"))
        t += rng.expovariate(plan.rate)
    for i in range(int(plan.duration_s // plan.long_every_s)):
        times.append(((i + rng.uniform(0.25, 0.75)) * plan.long_every_s, "long"))
    times.sort()
    arrivals = []
    for index, (at, kind) in enumerate(times[: plan.max_requests]):
        if kind == "short":
            prompt, output = rng.randint(*plan.short_prompt), rng.randint(*plan.short_output)
        else:
            prompt, output = rng.randint(*plan.long_prompt), plan.long_output
        tokens = tuple(rng.randrange(FIRST_ORDINARY_TOKEN, VOCAB_SIZE) for _ in range(prompt))
        arrivals.append(Arrival(index, at, kind, tokens, output))
    return arrivals


def warmup_schedule(seed: int, targets: int) -> list[Arrival]:
    """Per target: two short requests and a 512-token prompt, all at once."""
    rng = random.Random(seed)
    arrivals = []
    for index, (length, output) in enumerate([(96, 16), (128, 16), (512, 4)] * targets):
        tokens = tuple(rng.randrange(FIRST_ORDINARY_TOKEN, VOCAB_SIZE) for _ in range(length))
        arrivals.append(Arrival(index, 0.0, "warmup", tokens, output))
    return arrivals


def offered_load(schedule: Sequence[Arrival], plan: Plan) -> dict[str, Any]:
    """What the schedule asks for, per second of arrivals."""
    longs = [a for a in schedule if a.kind == "long"]
    return {
        "requests": len(schedule),
        "short": len(schedule) - len(longs),
        "long": len(longs),
        "prompt_tok_s": round(sum(len(a.prompt) for a in schedule) / plan.duration_s, 1),
        "output_tok_s": round(sum(a.max_tokens for a in schedule) / plan.duration_s, 1),
    }


# --------------------------------------------------------------------------- configurations


@dataclass(frozen=True, slots=True)
class Setup:
    name: str
    specs: tuple[WorkerSpec, ...]
    targets: tuple[str, ...]  # workers the client sends Decode to
    prefill: str | None  # the worker named as PrefillTarget (disaggregated only)
    prefill_budget: int  # --max-num-batched-tokens of the workers that prefill


def _engine_flags(budget: int) -> tuple[str, ...]:
    return (
        "--num-threads", "1",
        "--num-kv-blocks", str(NUM_KV_BLOCKS),
        "--max-num-batched-tokens", str(budget),
        "--metrics-port", "0",
    )  # fmt: skip


def make_setup(name: str) -> Setup:
    if name.startswith("disaggregated"):
        decode = ("--prefill-timeout", "600", "--on-prefill-failure", "fail", "--layer-wise")
        engine = _engine_flags(1024)
        if name == "disaggregated-page-first":
            engine = (*engine, "--kv-cache-order", "page_first")
        specs = (
            WorkerSpec("prefill_worker", "prefill-0", engine),
            WorkerSpec("decode_worker", "decode-0", (*engine, *decode)),
        )
        return Setup(name, specs, ("decode-0",), "prefill-0", 1024)
    budget = 256 if name == "colocated-256" else 1024
    specs = tuple(
        WorkerSpec("decode_worker", f"colocated-{i}", (*_engine_flags(budget), "--colocated"))
        for i in range(2)
    )
    return Setup(name, specs, ("colocated-0", "colocated-1"), None, budget)


# --------------------------------------------------------------------------- client


@dataclass(slots=True)
class Trace:
    """What the client saw of one request; times are ``time.perf_counter()`` seconds."""

    index: int
    kind: str
    prompt_tokens: int
    max_tokens: int
    target: str = ""
    scheduled: float = 0.0
    sent: float = 0.0
    times: list[float] = field(default_factory=list)  # arrival of each message with tokens
    counts: list[int] = field(default_factory=list)  # tokens in that message
    finished: bool = False
    prefilled_by: str = ""
    cached_tokens: int = 0
    error: str = ""


ROUTING = ("least-tokens", "least-requests", "round-robin")


class Client:
    """Sends Decode streams. With several targets, ``routing`` picks one per request:
    fewest outstanding tokens (the prompt until its first token arrives, plus the output
    not yet received), fewest outstanding requests, or plain rotation; ties go
    round-robin. Load is counted at the client, like a router would."""

    def __init__(
        self,
        addresses: dict[str, str],
        prefill: worker_pb2.PrefillTarget | None,
        routing: str = ROUTING[0],
    ) -> None:
        if routing not in ROUTING:
            raise ValueError(f"routing must be one of {ROUTING}, got {routing!r}")
        self._channels = {name: grpc.aio.insecure_channel(a) for name, a in addresses.items()}
        self._stubs = {n: worker_pb2_grpc.DecodeWorkerStub(c) for n, c in self._channels.items()}
        self._prefill = prefill
        self._routing = routing
        self._tokens = dict.fromkeys(addresses, 0)  # outstanding tokens per target
        self._requests = dict.fromkeys(addresses, 0)  # outstanding requests per target
        self._turn = itertools.count()

    def pick(self) -> str:
        names = list(self._tokens)
        start = next(self._turn) % len(names)
        rotated = names[start:] + names[:start]
        if self._routing == "round-robin":
            return rotated[0]
        load = self._tokens if self._routing == "least-tokens" else self._requests
        return min(rotated, key=load.__getitem__)

    async def run(self, arrival: Arrival, timeout_s: float, scheduled: float) -> Trace:
        trace = Trace(arrival.index, arrival.kind, len(arrival.prompt), arrival.max_tokens)
        cost = len(arrival.prompt) + arrival.max_tokens
        trace.target = self.pick()
        self._tokens[trace.target] += cost
        self._requests[trace.target] += 1
        trace.scheduled, trace.sent = scheduled, time.perf_counter()
        request = worker_pb2.DecodeRequest(
            request_id=f"{arrival.kind}-{arrival.index}",
            token_ids=arrival.prompt,
            sampling=worker_pb2.SamplingParams(
                max_tokens=arrival.max_tokens, temperature=0.0, ignore_eos=True
            ),
            prefill=self._prefill,
        )
        consumed = 0  # of cost: the prompt once the first token is in, then each token
        try:
            call = self._stubs[trace.target].Decode(request, timeout=timeout_s)
            async for message in call:
                now = time.perf_counter()
                if message.token_ids:
                    done = len(message.token_ids) + (0 if trace.times else len(arrival.prompt))
                    trace.times.append(now)
                    trace.counts.append(len(message.token_ids))
                    self._tokens[trace.target] -= done
                    consumed += done
                trace.prefilled_by = trace.prefilled_by or message.prefilled_by
                if message.finish_reason:
                    trace.finished = True
                    trace.cached_tokens = message.usage.cached_tokens
        except grpc.aio.AioRpcError as exc:
            trace.error = f"{exc.code().name}: {(exc.details() or '')[:200]}"
        except asyncio.CancelledError:
            trace.error = "cancelled: still running at the end of the drain timeout"
        finally:
            self._tokens[trace.target] -= cost - consumed
            self._requests[trace.target] -= 1
        return trace

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))


async def drive(client: Client, schedule: Sequence[Arrival], plan: Plan) -> list[Trace]:
    """Open loop: send each arrival at its time whatever is outstanding; then drain."""
    start = time.perf_counter() + 0.2
    tasks: list[asyncio.Task[Trace]] = []
    for arrival in schedule:
        due = start + arrival.at_s
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(client.run(arrival, plan.request_timeout_s, due)))
    _, pending = await asyncio.wait(tasks, timeout=plan.drain_timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return [task.result() for task in tasks]


# --------------------------------------------------------------------------- one configuration


def run_setup(
    setup: Setup, plan: Plan, schedule: list[Arrival], log_dir: Path, routing: str
) -> dict[str, Any]:
    load_before = os.getloadavg()
    print(f"\n[{setup.name}] starting {len(setup.specs)} workers ...", flush=True)
    with LocalCluster(setup.specs, log_dir / setup.name, namespace=f"bench-{setup.name}") as c:
        addresses = {name: c[name].grpc_address for name in setup.targets}
        prefill = None
        if setup.prefill is not None:
            worker = c[setup.prefill]
            prefill = worker_pb2.PrefillTarget(
                worker_id=worker.worker_id, grpc_address=worker.grpc_address
            )
        every = {name: worker.grpc_address for name, worker in c.workers.items()}
        traces, warm_s, wall_s, idle = asyncio.run(
            _load_phase(setup, lambda: Client(addresses, prefill, routing), plan, schedule, every)
        )
        dead = c.dead_workers()
    load_after = os.getloadavg()
    result = summarize_setup(traces)
    result.update(
        workers=[{"module": s.module, "name": s.name, "args": list(s.args)} for s in setup.specs],
        prefill_budget=setup.prefill_budget,
        routing=routing if len(setup.targets) > 1 else "single target",
        warmup_s=round(warm_s, 2),
        run_wall_s=round(wall_s, 2),
        load_average_before=list(load_before),
        load_average_after=list(load_after),
        worker_status_after=idle,
        dead_workers=dead,
    )
    if setup.prefill is not None:
        local = [t.index for t in traces if t.prefilled_by and t.prefilled_by != setup.prefill]
        result["not_prefilled_by_prefill_worker"] = local
    return result


async def _load_phase(
    setup: Setup,
    make_client: Callable[[], Client],
    plan: Plan,
    schedule: list[Arrival],
    workers: dict[str, str],
) -> tuple[list[Trace], float, float, dict[str, Any]]:
    """Warm-up, the measured run, then every worker's status once idle."""
    client = make_client()  # grpc.aio channels belong to the loop they are made in
    try:
        began = time.perf_counter()
        warm = await drive(client, warmup_schedule(plan.seed + 1, len(setup.targets)), plan)
        failed = [t.error for t in warm if t.error]
        if failed:
            raise RuntimeError(f"{setup.name}: warm-up failed: {failed[0]}")
        warm_s = time.perf_counter() - began
        print(f"[{setup.name}] warm ({warm_s:.1f}s); {len(schedule)} requests ...", flush=True)
        began = time.perf_counter()
        traces = await drive(client, schedule, plan)
        wall_s = time.perf_counter() - began
        idle = {name: await _idle_status(address) for name, address in workers.items()}
    finally:
        await client.close()
    return traces, warm_s, wall_s, idle


async def _idle_status(address: str, timeout_s: float = 15.0) -> dict[str, Any]:
    """The worker's status once it runs nothing (or after ``timeout_s``): used blocks > 0
    on an idle worker would be a leak."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerControlStub(channel)
        deadline = time.monotonic() + timeout_s
        while True:
            s = await stub.GetStatus(worker_pb2.GetStatusRequest(), timeout=10)
            idle = s.running == 0 and s.waiting == 0 and s.in_flight_transfers == 0
            if (idle and s.used_blocks == 0) or time.monotonic() > deadline:
                return {
                    "idle": idle,
                    "used_blocks": s.used_blocks,
                    "free_blocks": s.free_blocks,
                    "cached_blocks": s.cached_blocks,
                    "total_blocks": s.total_blocks,
                }
            await asyncio.sleep(0.2)


# --------------------------------------------------------------------------- statistics


def dist(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | int | None]:
    """p50 / p90 / p99 / max / mean (ms by default) of a sample; None when empty."""
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    out: dict[str, float | int | None] = {"n": len(values)}
    for q in (50, 90, 99):
        out[f"p{q}"] = round(percentile(values, q) * scale, 2)
    out["max"] = round(max(values) * scale, 2)
    out["mean"] = round(sum(values) / len(values) * scale, 2)
    return out


def summarize_setup(traces: Sequence[Trace]) -> dict[str, Any]:
    ok = [t for t in traces if t.finished and not t.error]
    short = [t for t in traces if t.kind == "short" and t.times]
    itl = [b - a for t in short for a, b in itertools.pairwise(t.times)]
    sends = [t.sent for t in traces]
    last = max((t.times[-1] for t in traces if t.times), default=0.0)
    tokens = sum(sum(t.counts) for t in traces)
    wall = last - min(sends) if sends and last else 0.0
    wrong_length = [t.index for t in ok if sum(t.counts) != t.max_tokens]
    return {
        "requests": {
            "sent": len(traces),
            "finished": len(ok),
            "short": sum(t.kind == "short" for t in traces),
            "long": sum(t.kind == "long" for t in traces),
            "errors": [f"#{t.index} {t.kind}: {t.error}" for t in traces if t.error],
            "wrong_length": wrong_length,
            "cached_tokens": sum(t.cached_tokens for t in traces),
        },
        "itl_short_ms": dist(itl),
        "itl_short_stalls": {f">{t}s": sum(g > t for g in itl) for t in STALL_THRESHOLDS_S},
        "ttft_short_ms": dist([t.times[0] - t.sent for t in short]),
        "ttft_long_ms": dist([t.times[0] - t.sent for t in traces if t.kind == "long" and t.times]),
        "e2e_short_ms": dist([t.times[-1] - t.sent for t in short if t.finished]),
        "output_tokens": tokens,
        "throughput_tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "makespan_s": round(wall, 2),
        "coalesced_messages": sum(c > 1 for t in traces for c in t.counts),
        "send_lag_ms": dist([t.sent - t.scheduled for t in traces]),
        "requests_per_worker": _per_worker(traces),
        "per_request": [_record(t, min(sends, default=0.0)) for t in traces],
    }


def _record(t: Trace, start: float) -> dict[str, Any]:
    """One request, compact, for reading a run's timeline afterwards."""
    gaps = [b - a for a, b in itertools.pairwise(t.times)]
    return {
        "index": t.index,
        "kind": t.kind,
        "prompt_tokens": t.prompt_tokens,
        "target": t.target,
        "sent_s": round(t.sent - start, 3),  # since this configuration's first send
        "ttft_ms": round((t.times[0] - t.sent) * 1000, 1) if t.times else None,
        "e2e_ms": round((t.times[-1] - t.sent) * 1000, 1) if t.times else None,
        "max_itl_ms": round(max(gaps) * 1000, 1) if gaps else None,
        "tokens": sum(t.counts),
        "prefilled_by": t.prefilled_by,
        "error": t.error or None,
    }


def _per_worker(traces: Sequence[Trace]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for t in traces:
        row = out.setdefault(t.target, {"short": 0, "long": 0})
        row[t.kind] += 1
    return out


# --------------------------------------------------------------------------- report

ROWS = (  # (label, summary key, field)
    ("ITL short p50 ms", "itl_short_ms", "p50"),
    ("ITL short p90 ms", "itl_short_ms", "p90"),
    ("ITL short p99 ms", "itl_short_ms", "p99"),
    ("ITL short max ms", "itl_short_ms", "max"),
    ("ITL gaps > 0.5 s", "itl_short_stalls", ">0.5s"),
    ("ITL gaps > 2 s", "itl_short_stalls", ">2.0s"),
    ("TTFT short p50 ms", "ttft_short_ms", "p50"),
    ("TTFT short p90 ms", "ttft_short_ms", "p90"),
    ("TTFT short p99 ms", "ttft_short_ms", "p99"),
    ("TTFT long p50 ms", "ttft_long_ms", "p50"),
    ("TTFT long p90 ms", "ttft_long_ms", "p90"),
    ("TTFT long p99 ms", "ttft_long_ms", "p99"),
    ("E2E short p50 ms", "e2e_short_ms", "p50"),
    ("E2E short p99 ms", "e2e_short_ms", "p99"),
    ("throughput tok/s", "throughput_tok_s", None),
)


def metric(summary: dict[str, Any], key: str, field_: str | None) -> float | None:
    value = summary.get(key)
    return value.get(field_) if isinstance(value, dict) and field_ else value


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def report(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    names = list(results)
    baselines = [n for n in names if n != "disaggregated"] if "disaggregated" in names else []
    headers = ["metric", *names, *(f"disagg/{b}" for b in baselines)]
    rows = []
    for label, key, field_ in ROWS:
        values = [metric(results[n], key, field_) for n in names]
        disagg = metric(results["disaggregated"], key, field_) if baselines else None
        ratios = [ratio(disagg, metric(results[b], key, field_)) for b in baselines]
        rows.append([label, *values, *ratios])
    counts = [f"{r['requests']['finished']}/{r['requests']['sent']} ok" for r in results.values()]
    rows.append(["requests", *counts, *([None] * len(baselines))])
    print_table(headers, rows, title="Disaggregated vs colocated (client-side latencies)")
    return goal(results)


def goal(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if "disaggregated" not in results or BASELINE not in results:
        return {"evaluated": False, "reason": f"needs disaggregated and {BASELINE}"}
    disagg = results["disaggregated"]["itl_short_ms"]["p99"]
    base = results[BASELINE]["itl_short_ms"]["p99"]
    r = ratio(disagg, base)
    verdict = "PASS" if r is not None and r <= GOAL_ITL_P99_RATIO else "MISS"
    print(
        f"\nGoal: p99 ITL disaggregated / {BASELINE} <= {GOAL_ITL_P99_RATIO}: "
        f"{disagg} ms / {base} ms = {r} -> {verdict}"
    )
    return {
        "evaluated": True,
        "metric": "itl_short_ms.p99",
        "baseline": BASELINE,
        "max_ratio": GOAL_ITL_P99_RATIO,
        "ratio": r,
        "verdict": verdict,
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (~1.5 min), 2 configs")
    parser.add_argument("--rate", type=float, help="short requests per second")
    parser.add_argument("--long-every", type=float, help="mean seconds between long prompts")
    parser.add_argument("--duration", type=float, help="seconds of arrivals per configuration")
    parser.add_argument("--max-requests", type=int, help="cap on requests per configuration")
    parser.add_argument("--seed", type=int, help="workload seed")
    parser.add_argument("--configs", help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument(
        "--colocated-routing", choices=ROUTING, default=ROUTING[0], help="client-side routing"
    )
    parser.add_argument("--out", help="JSON path")
    parser.add_argument("--log-dir", help="keep worker logs here (default: a temp dir)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp log dir")
    return parser.parse_args(argv)


def plan_from_args(args: argparse.Namespace) -> Plan:
    plan = Plan.quick() if args.quick else Plan()
    overrides = {
        "rate": args.rate,
        "long_every_s": args.long_every,
        "duration_s": args.duration,
        "max_requests": args.max_requests,
        "seed": args.seed,
    }
    return dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})


def configs_from_args(args: argparse.Namespace) -> list[str]:
    default = CONFIGS[:2] if args.quick else DEFAULT_CONFIGS
    names = args.configs.split(",") if args.configs else list(default)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {CONFIGS}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan, names = plan_from_args(args), configs_from_args(args)
    schedule = build_schedule(plan, plan.seed)
    warning = busy_machine_warning()
    if warning:
        print(warning)
    env = environment_info()
    offered = offered_load(schedule, plan)
    print(
        f"disagg vs colocated ({'quick' if args.quick else 'full'}): {offered['requests']} "
        f"requests ({offered['long']} long) over {plan.duration_s:.0f}s per configuration, "
        f"offered {offered['prompt_tok_s']} prompt tok/s + {offered['output_tok_s']} output "
        f"tok/s; configurations: {', '.join(names)}",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    with exit_on_signals(), log_directory(args.log_dir, args.keep_logs) as log_dir:
        for name in names:
            setup = make_setup(name)
            results[name] = run_setup(setup, plan, schedule, log_dir, args.colocated_routing)
    verdict = report(results)
    payload = {
        "benchmark": "disagg_vs_colocated",
        "mode": "quick" if args.quick else "full",
        "plan": dataclasses.asdict(plan),
        "offered_load": offered,
        "colocated_routing": args.colocated_routing,
        "goal": verdict,
        "results": results,
        "environment": env,
        "busy_machine_warning": warning,
    }
    default_name = "disagg_vs_colocated" + ("_quick" if args.quick else "")
    print(f"\nresults: {write_json(payload, default_name, args.out)}")
    failed = [n for n, r in results.items() if r["requests"]["errors"] or r["dead_workers"]]
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP: the workers are gone by now
        print(f"interrupted ({exc or 'SIGINT'}); workers stopped", file=sys.stderr)
        sys.exit(130)
