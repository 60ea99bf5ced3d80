"""Migration latency: from a decode worker's kill -9 to the next token of each migrated stream.

    python -m benchmarks.migration [--quick] [--streams N] [--rounds R] [--max-tokens M]

Real processes on 127.0.0.1: a private redis-server, one prefill and two decode workers
(the default model in fp32, one torch thread each) and ``python -m router`` (default pool,
``max_migrations`` 3). Each round:

1. ``N`` greedy streams (``ignore_eos``, ``M`` tokens) start at once; the router spreads
   them over the two decode workers (each stream's route names its worker).
2. Once every stream has a few tokens, the decode worker holding the most streams is
   killed with SIGKILL right after one of its streams received a token: its next step is
   then still being computed, so no token of the dead worker is in flight at the kill.
3. For each stream that was on it, the *migration gap* is the time from the kill to the
   next token the client receives (the router notices the broken stream, picks the other
   decode worker, the prefill worker recomputes prompt + tokens sent, the first resumed
   token arrives). The streams on the other worker give the ordinary inter-token gap
   around the kill, for comparison.
4. Every stream must finish with ``M`` tokens and the same text as an uninterrupted run of
   its prompt (done once, before the first round); the killed worker is restarted under a
   new id for the next round.

The table gives p50 / p99 / max of the migration gap and of the other streams' gap over
all rounds, plus the router's own ``router_migration_seconds`` (break → next token, on the
router). Results: ``benchmarks/results/migration[_quick].json``.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks._common import announce, bench_parser, log_directory, print_table, save
from common.server_process import RouterProcess, WorkerProcess, WorkerSpec
from loadgen.stack import LocalCluster, engine_flags
from loadgen.summary import percentile

WARM_TOKENS = 4  # tokens every stream has before the kill
KILL_WAIT_S = 120.0


@dataclass
class Stream:
    """One client stream: token arrival times (monotonic), text and route, as received."""

    prompt: str
    max_tokens: int
    arrivals: list[float] = field(default_factory=list)  # one per token
    text: str = ""
    decode_worker: str = ""
    finish: int = 0
    error: str = ""
    thread: threading.Thread | None = None
    got_token: threading.Event = field(default_factory=threading.Event)

    def start(self, address: str) -> Stream:
        self.thread = threading.Thread(target=self._run, args=(address,), daemon=True)
        self.thread.start()
        return self

    def _run(self, address: str) -> None:
        import grpc

        from router.client import build_request, stream_generate

        request = build_request(self.prompt, max_tokens=self.max_tokens, ignore_eos=True)
        try:
            for response in stream_generate(address, request, timeout_s=600):
                now = time.monotonic()
                if response.HasField("route"):
                    self.decode_worker = response.route.decode_worker
                self.arrivals.extend(now for _ in response.token_ids)
                self.text += response.text
                self.finish = response.finish_reason or self.finish
                if response.token_ids:
                    self.got_token.set()
        except grpc.RpcError as exc:
            self.error = f"{exc.code().name}: {exc.details()}"

    def join(self, timeout_s: float) -> None:
        assert self.thread is not None
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise TimeoutError(f"stream {self.prompt[:30]!r} still running after {timeout_s}s")

    def gap_after(self, moment: float) -> float | None:
        """Seconds from ``moment`` to the first token that arrived after it."""
        later = [t for t in self.arrivals if t > moment]
        return later[0] - moment if later else None


class MigrationBench:
    """The cluster, the router and the rounds; every process is killed on exit."""

    def __init__(self, log_dir: Path, kv_blocks: int) -> None:
        # fp32: greedy text equals the uninterrupted run (in bf16 greedy tokens depend on
        # the batch and on decode vs recompute, so runs can part ways)
        flags = (*engine_flags(kv_blocks), "--dtype", "float32")
        self.decode_args = (*flags, "--prefill-timeout", "600")
        specs = [
            WorkerSpec("prefill_worker", "prefill-0", flags),
            WorkerSpec("decode_worker", "decode-0", self.decode_args),
            WorkerSpec("decode_worker", "decode-1", self.decode_args),
        ]
        self.cluster = LocalCluster(specs, log_dir, namespace="bench-migration")
        self.log_dir = log_dir
        self.router: RouterProcess | None = None
        self._generation = 0

    def __enter__(self) -> MigrationBench:
        self.cluster.start()
        config = self.log_dir / "router.yaml"
        config.write_text(yaml.safe_dump({"pools": [{"name": "default"}], "max_migrations": 3}))
        self.router = RouterProcess(
            ["--config", str(config), "--redis-url", self.cluster.redis.url,
             "--namespace", self.cluster.namespace, "--port", "0", "--metrics-port", "0",
             "--log-level", "WARNING"],
            self.log_dir / "router.log",
        ).wait_ready()  # fmt: skip
        self.wait_decoders(2)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.router is not None:
            self.router.kill()
        self.cluster.stop()

    @property
    def address(self) -> str:
        assert self.router is not None
        return self.router.address

    def wait_decoders(self, count: int, timeout_s: float = 60.0) -> None:
        """Until the router sees exactly ``count`` live decode workers and one prefill."""
        from router.client import list_models

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            cards = list_models(self.address)
            if any((c.prefill_workers, c.decode_workers) == (1, count) for c in cards):
                return
            time.sleep(0.2)
        raise TimeoutError(f"the router does not see 1 prefill + {count} decode workers")

    def replace(self, name: str) -> None:
        """Start a new decode worker in place of the killed ``name`` (under a new id)."""
        self.cluster.workers.pop(name).kill()  # reaps the killed process
        self._generation += 1
        new = f"decode-r{self._generation}"
        extra = ("--redis-url", self.cluster.redis.url, "--namespace", self.cluster.namespace)
        spec = WorkerSpec("decode_worker", new, (*extra, *self.decode_args))
        self.cluster.workers[new] = WorkerProcess(spec, self.log_dir).wait_ready()

    def run_streams(self, prompts: Sequence[str], max_tokens: int) -> list[Stream]:
        return [Stream(p, max_tokens).start(self.address) for p in prompts]

    def router_migration_seconds(self) -> tuple[float, int]:
        """(sum, count) of the router's ``pdserve_router_migration_seconds`` histogram."""
        assert self.router is not None and self.router.metrics_address
        text = urllib.request.urlopen(f"http://{self.router.metrics_address}/metrics").read()
        total, count = 0.0, 0
        for line in text.decode().splitlines():
            if line.startswith("pdserve_router_migration_seconds_sum"):
                total += float(line.split()[-1])
            elif line.startswith("pdserve_router_migration_seconds_count"):
                count += int(float(line.split()[-1]))
        return total, count

    def round(self, prompts: Sequence[str], max_tokens: int) -> dict[str, Any]:
        """One kill under ``prompts``; the streams' gaps and what the victim held."""
        streams = self.run_streams(prompts, max_tokens)
        _wait(lambda: all(len(s.arrivals) >= WARM_TOKENS for s in streams), KILL_WAIT_S)
        held: dict[str, list[Stream]] = {}
        for s in streams:
            held.setdefault(s.decode_worker, []).append(s)
        victim = max(held, key=lambda w: len(held[w]))
        process = self.cluster.workers[victim]
        on_victim = held[victim]
        on_victim[0].got_token.clear()
        on_victim[0].got_token.wait(30)  # just after a step's tokens: the next is computing
        killed_at = time.monotonic()
        process.signal(signal.SIGKILL)
        tokens_at_kill = [len(s.arrivals) for s in on_victim]
        for s in streams:
            s.join(600)
        others = [s for s in streams if s.decode_worker != victim]
        return {
            "victim": victim,
            "streams": streams,
            "migrated": on_victim,
            "tokens_at_kill": tokens_at_kill,
            "migration_gaps_s": [s.gap_after(killed_at) for s in on_victim],
            "other_gaps_s": [s.gap_after(killed_at) for s in others],
        }


def _wait(predicate: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("streams did not start in time")
        time.sleep(0.01)


def _prompts(count: int) -> list[str]:
    return [
        f"Story {i}: the lighthouse keeper counted the ships that passed the harbour, and"
        for i in range(count)
    ]


def _summary(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ms = [v * 1000.0 for v in values]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = bench_parser(__doc__ or "", quick="4 streams, 1 round, 32 tokens")
    parser.add_argument("--streams", type=int, default=None, help="streams per round (8)")
    parser.add_argument("--rounds", type=int, default=None, help="kills (3)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per stream (64)")
    parser.add_argument("--log-dir", default=None, help="keep the processes' logs here")
    args = parser.parse_args(argv)
    streams = args.streams or (4 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 3)
    max_tokens = args.max_tokens or (32 if args.quick else 64)
    context = announce()
    prompts = _prompts(streams)
    with log_directory(args.log_dir) as log_dir, MigrationBench(log_dir, kv_blocks=512) as bench:
        results = _run(bench, prompts, rounds, max_tokens)
    _report(results, args, context, streams, rounds, max_tokens)


def _run(
    bench: MigrationBench, prompts: Sequence[str], rounds: int, max_tokens: int
) -> dict[str, Any]:
    reference = bench.run_streams(prompts, max_tokens)  # uninterrupted, and a warm-up
    for s in reference:
        s.join(600)
    _check(reference, reference, max_tokens)
    per_round: list[dict[str, Any]] = []
    for i in range(rounds):
        r = bench.round(prompts, max_tokens)
        _check(r["streams"], reference, max_tokens)
        per_round.append(r)
        print(
            f"round {i + 1}: killed {r['victim']} under {len(r['migrated'])} streams "
            f"(tokens at the kill {r['tokens_at_kill']})",
            flush=True,
        )
        if i + 1 < rounds:
            time.sleep(3.5)  # the dead worker's registration expires (heartbeat TTL 3 s)
            bench.replace(r["victim"])
            bench.wait_decoders(2)
    router_sum, router_count = bench.router_migration_seconds()
    return {"rounds": per_round, "router_sum_s": router_sum, "router_count": router_count}


def _check(streams: Sequence[Stream], reference: Sequence[Stream], max_tokens: int) -> None:
    """Every stream complete, with the uninterrupted run's text: a benchmark of broken
    streams would measure nothing."""
    for s, want in zip(streams, reference, strict=True):
        if s.error:
            raise RuntimeError(f"a stream failed: {s.error}")
        if len(s.arrivals) != max_tokens or s.text != want.text:
            raise RuntimeError(
                f"stream {s.prompt[:20]!r}: {len(s.arrivals)} tokens, text equal to the "
                f"uninterrupted run: {s.text == want.text}"
            )


def _report(
    results: dict[str, Any],
    args: argparse.Namespace,
    context: dict[str, Any],
    streams: int,
    rounds: int,
    max_tokens: int,
) -> None:
    migrated = [g for r in results["rounds"] for g in r["migration_gaps_s"] if g is not None]
    others = [g for r in results["rounds"] for g in r["other_gaps_s"] if g is not None]
    gap, other = _summary(migrated), _summary(others)
    count = results["router_count"]
    router_mean = results["router_sum_s"] / count * 1000.0 if count else None
    print_table(
        ["streams", "n", "p50 ms", "p99 ms", "max ms"],
        [
            ["migrated: kill → next token", gap["n"], gap["p50_ms"], gap["p99_ms"], gap["max_ms"]],
            [
                "not migrated: kill → next token",
                other["n"],
                other["p50_ms"],
                other["p99_ms"],
                other["max_ms"],
            ],
        ],
        title=f"Migration latency ({streams} streams x {rounds} rounds, {max_tokens} tokens, "
        f"1P+2D, kill -9 of the busier decode worker)",
    )
    if router_mean is not None:
        print(f"router_migration_seconds: {count} migrations, mean {router_mean:.1f} ms")
    save(
        "migration",
        {
            **context,
            "config": {"streams": streams, "rounds": rounds, "max_tokens": max_tokens},
            "migration_gap": gap,
            "other_streams_gap": other,
            "router_migration_seconds": {"count": count, "mean_ms": router_mean},
            "rounds": [
                {
                    "victim": r["victim"],
                    "migrated_streams": len(r["migrated"]),
                    "tokens_at_kill": r["tokens_at_kill"],
                    "migration_gaps_ms": [
                        None if g is None else g * 1000.0 for g in r["migration_gaps_s"]
                    ],
                }
                for r in results["rounds"]
            ],
            "outputs_equal_uninterrupted_run": True,
        },
        args,
    )


if __name__ == "__main__":
    main()
