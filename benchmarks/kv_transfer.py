"""KV transfer bandwidth and layer-wise overlap, against the transport's and machine's limits.

Two processes on loopback: this one is the prefill side (a ``TorchDistSender``), a spawned
peer is the decode side (a ``TorchDistReceiver``). Both use the default model's KV
geometry (SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, fp32, 16-token blocks,
720 KiB per block, 12 KiB of K or V per block and layer), caches of 1024 blocks, and one
torch thread each, like workers on the 2-core local cluster.

Bandwidth, per size (1, 16, 64, 256 MiB of KV rounded to whole blocks, and the KV of a
128-, 1k- and 4k-token prompt), measured in the same run and interleaved rep by rep:

* ``realistic``  end to end: ``send()`` until the sender's transfer is DONE, i.e. the
  receiver has landed every block in its (different) destination ids and said so —
  pack, send, land and the handshakes. Source ids are a prompt's blocks in a prefill
  worker's prefix-caching cache, destination ids a reservation in a decode worker's
  cache, each side's engine ``BlockManager`` driven the way that worker drives it and
  warmed up by ``WARMUP`` requests (``benchmarks/_block_ids.py``); long segments go
  straight from cache to cache, short ones through staging. **The 80 % goal is judged on
  this case.**
* ``scattered``  the same with both sides' ids a random permutation: no two neighbours
  are adjacent, every block goes through gather, staging and scatter. Shown, not judged.
* ``gloo``       the transport's limit: a plain gloo pair between the same two processes
  sends one contiguous tensor of the same size; the receiver answers with a one-element
  ack (so both sides include the completion round trip).
* ``memcpy``     the machine's limit: one local ``copy_`` of the same size.

GB/s are 10^9 bytes per second of KV, medians over the reps. Goal: realistic >= 80 % of
gloo for sizes >= 16 MiB. The CPU columns add up the CPU time of both processes (all
threads) during a transfer; ``pack+land`` is the gather and scatter of the scattered
case done on one thread with no wire — gloo's CPU plus that is the floor of the staged
path on a CPU-bound box. ``segs`` is the median number of segments (stretches that are
one run on both sides) of the realistic transfers; the JSON also has the mean run length
of their source and destination ids.

How long the engine's runs stay under churn, and what that costs in prefix hits, is
``benchmarks/allocator.py``.

Layer-wise overlap, 1k-token prompt, realistic ids: a per-layer compute proxy with
SmolLM2's shapes (RMSNorm, q/k/v/o projections, causal SDPA with 9 query / 3 KV heads,
SiLU MLP 576→1536) computes each layer and writes its K/V into the source blocks, then
marks the layer ready. The exposed transfer time is what is left after the last layer is
computed (until the receiver has landed everything); ``hidden = 1 - exposed /
whole-transfer time``. Goal: hidden >= 70 %.

Run: ``python benchmarks/kv_transfer.py [--quick] [--chunk-mib N] [--depth N]
[--direct-kib N] [--out PATH]``. Results: ``benchmarks/results/kv_transfer.json``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks._block_ids import (
    DecodeSide,
    PrefillSide,
    contiguous_ids,
    mean_run,
    scattered_ids,
)
from benchmarks._common import (
    busy_machine_warning,
    environment_info,
    median,
    print_table,
    write_json,
)
from common.env import apply_offline_defaults
from engine.kv_cache import KVCache, KVLayout
from kv_transfer.packing import Staging, layer_block_bytes, pack_staged, staged_ids, unpack_staged
from kv_transfer.receiver import TorchDistReceiver
from kv_transfer.segments import direct_blocks, long_runs, overlaps, plan_frames
from kv_transfer.sender import TorchDistSender
from kv_transfer.types import (
    PeerAddress,
    RecvSpec,
    SendSpec,
    TransferConfig,
    TransferMode,
    TransferState,
)

MODEL = "SmolLM2-135M-Instruct"
GEOMETRY = {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "block_size": 16}
BLOCK_BYTES = KVLayout(**GEOMETRY, num_blocks=1).bytes_per_block
CACHE_BLOCKS = 1024  # per side: 720 MiB of KV
WARMUP = 1000  # requests (1-64 blocks) through each side's allocator before any draw
MIB = 1 << 20
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 576, 9, 3, 64, 1536  # SmolLM2-135M
IDS = ("contiguous", "realistic", "scattered")


@dataclass(frozen=True)
class Sample:
    wall_s: float
    cpu_s: float  # CPU time of both processes (all threads) during the transfer


@dataclass(frozen=True)
class Case:
    label: str
    blocks: int

    @property
    def nbytes(self) -> int:
        return self.blocks * BLOCK_BYTES


def cases() -> list[Case]:
    sizes = [Case(f"{m} MiB", max(1, round(m * MIB / BLOCK_BYTES))) for m in (1, 16, 64, 256)]
    prompts = [Case(f"{t}-token prompt", -(-t // 16)) for t in (128, 1024, 4096)]
    return sizes + prompts


# --------------------------------------------------------------------------- block ids


def segments(src: tuple[int, ...], dst: tuple[int, ...]) -> int:
    """Stretches that are one run on both sides (direct pieces if long enough)."""
    return len(overlaps(long_runs(src, 1, len(src)), long_runs(dst, 1, len(dst))))


# --------------------------------------------------------------------------- peer process


def _raw_pair(store: dist.Store, rank: int) -> dist.ProcessGroup:
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timedelta(seconds=60)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return dist.ProcessGroupGloo(dist.PrefixStore("raw/", store), rank, 2, opts)


def _peer(conn: Connection, config: TransferConfig) -> None:
    apply_offline_defaults()
    torch.set_num_threads(1)
    cache = KVCache(KVLayout(**GEOMETRY, num_blocks=CACHE_BLOCKS))
    cache.tensor.fill_(1.0)  # fault the pages in before anything is timed
    receiver = TorchDistReceiver(cache, MODEL, config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        None,
        True,
        timedelta(seconds=60),
        wait_for_workers=False,
        master_listen_fd=sock.detach(),  # the store owns the descriptor from here on
    )
    conn.send((str(receiver.address), port))
    raw = _raw_pair(store, 0)
    ack = torch.zeros(1)
    buffers: dict[int, torch.Tensor] = {}
    while True:
        cmd, arg = conn.recv()
        if cmd == "expect":
            tid, ids = arg
            receiver.expect(RecvSpec(tid, ids, timeout_s=120), lambda _: None)
            conn.send(time.process_time())
        elif cmd == "raw":
            buf = buffers.setdefault(arg, torch.ones(arg // 4))
            work = raw.recv([buf], 1, 0)
            conn.send(time.process_time())  # the recv is posted; the sender may start
            work.wait()
            raw.send([ack], 1, 1).wait()
        elif cmd == "cpu":
            conn.send(time.process_time())
        else:
            receiver.close()
            conn.send("bye")
            return


# --------------------------------------------------------------------------- measurements


class Bench:
    def __init__(
        self, conn: Connection, sender: TorchDistSender, address: PeerAddress, raw: Any
    ) -> None:
        self.conn = conn
        self.sender = sender
        self.address = address
        self.raw = raw
        self.rng = random.Random(0)
        self.count = 0
        self.prefill = PrefillSide(CACHE_BLOCKS, random.Random(1), WARMUP)
        self.decode = DecodeSide(CACHE_BLOCKS, random.Random(2), WARMUP)

    def ids(self, kind: str, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Source and destination ids, drawn independently (different ids, different runs)."""
        if kind == "realistic":
            return self.prefill.draw(n), self.decode.draw(n)
        draw = contiguous_ids if kind == "contiguous" else scattered_ids
        return draw(n, CACHE_BLOCKS, self.rng), draw(n, CACHE_BLOCKS, self.rng)

    def expect(self, dst: tuple[int, ...]) -> tuple[str, float]:
        """Register a transfer on the peer; returns its id and the peer's CPU time."""
        self.count += 1
        tid = f"bench-{self.count}"
        self.conn.send(("expect", (tid, dst)))
        return tid, self.conn.recv()

    def _peer_cpu(self) -> float:
        self.conn.send(("cpu", None))
        return self.conn.recv()

    def ours(self, src: tuple[int, ...], dst: tuple[int, ...]) -> Sample:
        tid, peer_cpu = self.expect(dst)
        cpu, start = time.process_time(), time.perf_counter()
        transfer = self.sender.send(SendSpec(tid, self.address, src), lambda _: None)
        state = transfer.wait(120)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        if state is not TransferState.DONE:
            raise RuntimeError(f"transfer failed: {transfer.error}")
        return Sample(elapsed, cpu + self._peer_cpu() - peer_cpu)

    def gloo(self, nbytes: int, buf: torch.Tensor) -> Sample:
        ack = torch.zeros(1)
        self.conn.send(("raw", nbytes))
        peer_cpu = self.conn.recv()
        cpu, start = time.process_time(), time.perf_counter()
        self.raw.send([buf], 0, 0).wait()
        self.raw.recv([ack], 0, 1).wait()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        return Sample(elapsed, cpu + self._peer_cpu() - peer_cpu)


def memcpy(nbytes: int, reps: int) -> float:
    src, dst = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
    dst.copy_(src)  # first touch
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return median(times)


def pack_land(bench: Bench, n: int, reps: int) -> float:
    """Seconds to gather and scatter ``n`` scattered blocks frame by frame on one thread,
    no wire: the CPU the staged path adds on top of gloo's own."""
    cache, config = bench.sender.cache, bench.sender.config
    src, dst = bench.ids("scattered", n)
    lbb = layer_block_bytes(cache.layout)
    min_blocks = direct_blocks(config.direct_min_bytes, lbb)
    plan = plan_frames(
        n,
        cache.layout.num_layers,
        lbb,
        TransferMode.WHOLE,
        config.chunk_bytes,
        config.direct_min_bytes,
        long_runs(src, min_blocks, n),
        long_runs(dst, min_blocks, n),
    )
    staging = Staging(cache.device)
    index = [(staged_ids(src, f, cache.device), staged_ids(dst, f, cache.device)) for f in plan]
    times = []
    for _ in range(reps + 1):  # the first run grows the frames
        start = time.perf_counter()
        for frame, (src_idx, dst_idx) in zip(plan, index, strict=True):
            buf = staging.frame(0, frame.staged_bytes(lbb))
            pack_staged(cache, src_idx, frame, buf)
            unpack_staged(cache, dst_idx, frame, buf)  # into other blocks of the same cache
        times.append(time.perf_counter() - start)
    return median(times[1:])


def bandwidth(bench: Bench, reps_for: dict[int, int]) -> list[dict[str, Any]]:
    rows = []
    for case in cases():
        reps = reps_for[case.nbytes]
        buf = torch.ones(case.nbytes // 4)
        for kind in IDS:  # warm-up: staging frames, pages, pair
            bench.ours(*bench.ids(kind, case.blocks))
        bench.gloo(case.nbytes, buf)
        ours: dict[str, list[Sample]] = {kind: [] for kind in IDS}
        gloo: list[Sample] = []
        # Drawn up front: replaying the allocator's churn is a CPU burst of its own.
        draws = [{kind: bench.ids(kind, case.blocks) for kind in IDS} for _ in range(reps)]
        segs = [segments(*ids["realistic"]) for ids in draws]
        for ids in draws:  # interleaved, so a burst of load hits all alike
            for kind in IDS:
                ours[kind].append(bench.ours(*ids[kind]))
            gloo.append(bench.gloo(case.nbytes, buf))
        gloo_s = median([x.wall_s for x in gloo])
        row: dict[str, Any] = {
            "case": case.label,
            "blocks": case.blocks,
            "mib": case.nbytes / MIB,
            "segments": median(segs),
            "realistic_src_mean_run": mean_run([ids["realistic"][0] for ids in draws]),
            "realistic_dst_mean_run": mean_run([ids["realistic"][1] for ids in draws]),
            "gloo_s": gloo_s,
            "gloo_gbps": case.nbytes / gloo_s / 1e9,
            "gloo_cpu_s": median([x.cpu_s for x in gloo]),
            "gloo_all_s": [x.wall_s for x in gloo],
            "memcpy_gbps": case.nbytes / memcpy(case.nbytes, reps) / 1e9,
            "pack_land_s": pack_land(bench, case.blocks, reps),
            "reps": reps,
        }
        for kind in IDS:
            wall = median([x.wall_s for x in ours[kind]])
            row[f"{kind}_s"] = wall
            row[f"{kind}_gbps"] = case.nbytes / wall / 1e9
            row[f"{kind}_vs_gloo"] = gloo_s / wall
            row[f"{kind}_cpu_s"] = median([x.cpu_s for x in ours[kind]])
            row[f"{kind}_all_s"] = [x.wall_s for x in ours[kind]]
        rows.append(row)
        print(
            f"  {case.label:>17}: contiguous {row['contiguous_gbps']:.2f}, realistic "
            f"{row['realistic_gbps']:.2f} ({row['segments']:g} segments; runs "
            f"{row['realistic_src_mean_run']:.1f} / {row['realistic_dst_mean_run']:.1f}), "
            f"scattered "
            f"{row['scattered_gbps']:.2f}, gloo {row['gloo_gbps']:.2f}, memcpy "
            f"{row['memcpy_gbps']:.2f} GB/s",
            flush=True,
        )
    return rows


class LayerProxy:
    """One Llama decoder layer of SmolLM2's shapes (shared weights; same FLOPs per layer)."""

    def __init__(self, tokens: int) -> None:
        g = torch.Generator().manual_seed(1)

        def w(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g) * 0.02

        self.q, self.kv = w(HIDDEN, HIDDEN), w(2 * KV_HEADS * HEAD_DIM, HIDDEN)
        self.o = w(HIDDEN, HIDDEN)
        self.gate_up, self.down = w(2 * INTERMEDIATE, HIDDEN), w(HIDDEN, INTERMEDIATE)
        self.x = torch.randn(tokens, HIDDEN, generator=g)
        self.tokens = tokens

    def __call__(self, cache: KVCache, layer: int, block_ids: torch.Tensor) -> None:
        t, hd = self.tokens, HEAD_DIM
        h = F.rms_norm(self.x, (HIDDEN,))
        q = (h @ self.q.T).view(t, HEADS, hd).transpose(0, 1)
        k, v = (h @ self.kv.T).view(t, 2, KV_HEADS, hd).unbind(1)
        attn = F.scaled_dot_product_attention(
            q, k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
        )
        h = self.x + attn.transpose(0, 1).reshape(t, HIDDEN) @ self.o.T
        gate, up = (F.rms_norm(h, (HIDDEN,)) @ self.gate_up.T).chunk(2, dim=-1)
        _ = h + (F.silu(gate) * up) @ self.down.T
        # The layer's K and V land in the prompt's blocks, as the model runner would do.
        bs = GEOMETRY["block_size"]
        padded = block_ids.numel() * bs
        kv = torch.zeros(2, padded, KV_HEADS, hd)
        kv[0, :t], kv[1, :t] = k, v
        cache.scatter(block_ids, kv.view(2, -1, bs, KV_HEADS, hd), layer=layer)


def overlap(bench: Bench, whole_s: float, runs: int) -> dict[str, Any]:
    tokens = 1024
    n = -(-tokens // GEOMETRY["block_size"])
    proxy = LayerProxy(tokens)
    cache = bench.sender.cache
    layers = GEOMETRY["num_layers"]
    compute_only, exposed, compute_with = [], [], []
    for _ in range(runs):
        src, dst = bench.ids("realistic", n)
        ids = torch.tensor(src)
        start = time.perf_counter()
        for layer in range(layers):
            proxy(cache, layer, ids)
        compute_only.append(time.perf_counter() - start)

        tid, _ = bench.expect(dst)
        spec = SendSpec(tid, bench.address, src, TransferMode.LAYERWISE)
        start = time.perf_counter()
        transfer = bench.sender.send(spec, lambda _: None)
        for layer in range(layers):
            proxy(cache, layer, ids)
            transfer.mark_layer_ready(layer)
        computed = time.perf_counter()
        if transfer.wait(120) is not TransferState.DONE:
            raise RuntimeError(f"layer-wise transfer failed: {transfer.error}")
        exposed.append(time.perf_counter() - computed)
        compute_with.append(computed - start)
    result = {
        "tokens": tokens,
        "kv_mib": n * BLOCK_BYTES / MIB,
        "compute_s": median(compute_only),
        "compute_with_transfer_s": median(compute_with),
        "whole_transfer_s": whole_s,
        "exposed_s": median(exposed),
        "runs": runs,
    }
    result["hidden"] = 1 - result["exposed_s"] / whole_s
    result["compute_slowdown"] = result["compute_with_transfer_s"] / result["compute_s"] - 1
    return result


# --------------------------------------------------------------------------- report


def report(rows: list[dict[str, Any]], lw: dict[str, Any]) -> dict:
    def pct(x: float) -> str:
        return f"{100 * x:.0f}%"

    print_table(
        ["KV", "MiB", "segs", "contig GB/s", "realistic GB/s", "scattered GB/s", "gloo GB/s",
         "memcpy GB/s", "contig/gloo", "REALISTIC/gloo", "scattered/gloo"],
        [
            [r["case"], r["mib"], r["segments"], r["contiguous_gbps"], r["realistic_gbps"],
             r["scattered_gbps"], r["gloo_gbps"], r["memcpy_gbps"],
             pct(r["contiguous_vs_gloo"]), pct(r["realistic_vs_gloo"]),
             pct(r["scattered_vs_gloo"])]
            for r in rows
        ],
        title="KV transfer bandwidth (medians; GB/s = 1e9 B/s; the goal is judged on REALISTIC)",
    )  # fmt: skip
    print_table(
        ["KV", "contig ms", "realistic ms", "scattered ms", "gloo ms", "realistic CPU ms",
         "scattered CPU ms", "gloo CPU ms", "pack+land ms"],
        [
            [r["case"], 1e3 * r["contiguous_s"], 1e3 * r["realistic_s"], 1e3 * r["scattered_s"],
             1e3 * r["gloo_s"], 1e3 * r["realistic_cpu_s"], 1e3 * r["scattered_cpu_s"],
             1e3 * r["gloo_cpu_s"], 1e3 * r["pack_land_s"]]
            for r in rows
        ],
        title="Wall and CPU time (both processes) per transfer, medians",
    )  # fmt: skip
    big = [r for r in rows if r["mib"] >= 16]
    worst = {kind: min(r[f"{kind}_vs_gloo"] for r in big) for kind in IDS}
    verdict = "PASS" if worst["realistic"] >= 0.8 else "MISS"
    print(
        f"\ngoal ours >= 80% of gloo for >= 16 MiB, judged on realistic ids: worst "
        f"{pct(worst['realistic'])} -> {verdict}  (contiguous: {pct(worst['contiguous'])}, "
        f"scattered: {pct(worst['scattered'])}, not judged)"
    )
    print(
        f"layer-wise, 1k-token prompt ({lw['kv_mib']:.1f} MiB, realistic ids): compute "
        f"{lw['compute_s']:.2f} s alone, {lw['compute_with_transfer_s']:.2f} s with the "
        f"transfer ({100 * lw['compute_slowdown']:+.1f}%); whole transfer "
        f"{1e3 * lw['whole_transfer_s']:.1f} ms, exposed after compute "
        f"{1e3 * lw['exposed_s']:.1f} ms -> hidden {pct(lw['hidden'])} "
        f"({'PASS' if lw['hidden'] >= 0.7 else 'MISS'} >= 70%)"
    )
    return {
        "judged_on": "realistic",
        "realistic_vs_gloo_min_ge_16mib": worst["realistic"],
        "contiguous_vs_gloo_min_ge_16mib": worst["contiguous"],
        "scattered_vs_gloo_min_ge_16mib": worst["scattered"],
        "bandwidth_pass": worst["realistic"] >= 0.8,
        "layerwise_hidden": lw["hidden"],
        "layerwise_pass": lw["hidden"] >= 0.7,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer reps, one overlap run")
    parser.add_argument("--chunk-mib", type=float, default=None, help="frame payload size")
    parser.add_argument("--depth", type=int, default=None, help="frames in flight per pair")
    parser.add_argument(
        "--direct-kib", type=float, default=None, help="smallest piece sent in place"
    )
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args()
    apply_offline_defaults()
    torch.set_num_threads(1)

    defaults = TransferConfig()
    config = TransferConfig(
        timeout_s=120.0,
        chunk_bytes=int(args.chunk_mib * MIB) if args.chunk_mib else defaults.chunk_bytes,
        pipeline_depth=args.depth or defaults.pipeline_depth,
        direct_min_bytes=(
            int(args.direct_kib * 1024)
            if args.direct_kib is not None
            else defaults.direct_min_bytes
        ),
    )
    warning = busy_machine_warning()
    if warning:
        print(warning, flush=True)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    peer = ctx.Process(target=_peer, args=(child, config), daemon=True)
    peer.start()
    address, raw_port = conn.recv()
    store = dist.TCPStore(
        "127.0.0.1", raw_port, None, False, timedelta(seconds=60), wait_for_workers=False
    )
    raw = _raw_pair(store, 1)
    cache = KVCache(KVLayout(**GEOMETRY, num_blocks=CACHE_BLOCKS))
    cache.tensor.normal_()
    sender = TorchDistSender(cache, MODEL, config)
    bench = Bench(conn, sender, PeerAddress.parse(address), raw)

    # Medians of enough reps that one burst of load on the shared 2-core box cannot move
    # them: with 7 / 4 reps, two cases with the same plan differed by up to 15 %.
    reps_for = {
        c.nbytes: (3 if args.quick else 15) if c.nbytes < 128 * MIB else (2 if args.quick else 7)
        for c in cases()
    }
    print(
        f"KV transfer benchmark ({'quick' if args.quick else 'full'}), chunk "
        f"{config.chunk_bytes / MIB:g} MiB, depth {config.pipeline_depth}, direct pieces "
        f">= {config.direct_min_bytes / 1024:g} KiB, block {BLOCK_BYTES // 1024} KiB",
        flush=True,
    )
    rows = bandwidth(bench, reps_for)
    whole_1k = next(r["realistic_s"] for r in rows if r["case"] == "1024-token prompt")
    print("  layer-wise overlap (1k-token prompt)...", flush=True)
    lw = overlap(bench, whole_1k, 1 if args.quick else 2)
    goals = report(rows, lw)

    conn.send(("stop", None))
    conn.recv()
    sender.close()
    peer.join(timeout=10)
    payload = {
        "benchmark": "kv_transfer",
        "environment": environment_info(),
        "busy_machine_warning": warning,
        "quick": args.quick,
        "chunk_bytes": config.chunk_bytes,
        "pipeline_depth": config.pipeline_depth,
        "direct_min_bytes": config.direct_min_bytes,
        "block_bytes": BLOCK_BYTES,
        "cache_blocks": CACHE_BLOCKS,
        "realistic_warmup_requests": WARMUP,
        "bandwidth": rows,
        "layerwise": lw,
        "goals": goals,
    }
    print(f"wrote {write_json(payload, 'kv_transfer', args.out)}")


if __name__ == "__main__":
    main()
