"""KV transfer bandwidth and layer-wise overlap, against the transport's and machine's limits.

Two processes on loopback: this one is the prefill side (a ``TorchDistSender``), a spawned
peer is the decode side (a ``TorchDistReceiver``). Both use the default model's KV
geometry (SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, fp32, 16-token blocks,
720 KiB per block) and one torch thread each, like workers on the 2-core local cluster.

Bandwidth, per size (1, 16, 64, 256 MiB of KV rounded to whole blocks, and the KV of a
128-, 1k- and 4k-token prompt), measured in the same run and interleaved rep by rep:

* ``ours``    end to end: ``send()`` of randomly scattered source blocks until the
  sender's transfer is DONE, i.e. the receiver has landed every block in its (different,
  scattered) destination ids and said so. Includes pack, send, land and the handshakes.
* ``gloo``    the transport's limit: a plain gloo pair between the same two processes
  sends one contiguous tensor of the same size; the receiver answers with a one-element
  ack (so both sides include the completion round trip).
* ``memcpy``  the machine's limit: one local ``copy_`` of the same size.

GB/s are 10^9 bytes per second of KV, medians over the reps. Goal: ours >= 80% of gloo
for sizes >= 16 MiB. The CPU columns add up the CPU time of both processes (all threads)
during a transfer, and ``pack+land`` is the same gather and scatter done on one thread
with no wire: gloo's CPU plus that is the floor of ours. When the transfer is CPU-bound
(a shared 2-core box), wall time follows CPU time, so that floor bounds the ratio.

Layer-wise overlap, 1k-token prompt: a per-layer compute proxy with SmolLM2's shapes
(RMSNorm, q/k/v/o projections, causal SDPA with 9 query / 3 KV heads, SiLU MLP 576→1536)
computes each layer and writes its K/V into the source blocks, then marks the layer ready.
The exposed transfer time is what is left after the last layer is computed (until the
receiver has landed everything); ``hidden = 1 - exposed / whole-transfer time``. Goal:
hidden >= 70%. Also reported: how much the concurrent transfer slows the compute.

Run: ``python benchmarks/kv_transfer.py [--quick] [--chunk-mib N] [--depth N] [--out PATH]``.
Results: ``benchmarks/results/kv_transfer.json``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
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

from benchmarks._common import environment_info, median, print_table, write_json
from common.env import apply_offline_defaults
from engine.kv_cache import KVCache, KVLayout
from kv_transfer.packing import Staging, block_index, layer_block_bytes, pack, unpack
from kv_transfer.receiver import TorchDistReceiver
from kv_transfer.sender import TorchDistSender
from kv_transfer.types import (
    PeerAddress,
    RecvSpec,
    SendSpec,
    TransferConfig,
    TransferMode,
    TransferState,
)
from kv_transfer.wire import plan_chunks

MODEL = "SmolLM2-135M-Instruct"
GEOMETRY = {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "block_size": 16}
BLOCK_BYTES = KVLayout(**GEOMETRY, num_blocks=1).bytes_per_block
MIB = 1 << 20
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 576, 9, 3, 64, 1536  # SmolLM2-135M


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


# --------------------------------------------------------------------------- peer process


def _raw_pair(store: dist.Store, rank: int) -> dist.ProcessGroup:
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timedelta(seconds=60)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return dist.ProcessGroupGloo(dist.PrefixStore("raw/", store), rank, 2, opts)


def _peer(conn: Connection, num_blocks: int, config: TransferConfig) -> None:
    apply_offline_defaults()
    torch.set_num_threads(1)
    cache = KVCache(KVLayout(**GEOMETRY, num_blocks=num_blocks))
    receiver = TorchDistReceiver(cache, MODEL, config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    store = dist.TCPStore(
        "127.0.0.1",
        sock.getsockname()[1],
        None,
        True,
        timedelta(seconds=60),
        wait_for_workers=False,
        master_listen_fd=sock.fileno(),
    )
    conn.send((str(receiver.address), sock.getsockname()[1]))
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
            buf = buffers.setdefault(arg, torch.zeros(arg // 4))
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
        self,
        conn: Connection,
        sender: TorchDistSender,
        address: PeerAddress,
        raw: dist.ProcessGroup,
        peer_blocks: int,
    ) -> None:
        self.conn = conn
        self.sender = sender
        self.address = address
        self.raw = raw
        self.peer_blocks = peer_blocks
        self.rng = torch.Generator().manual_seed(0)
        self.count = 0

    def _ids(self, n: int, total: int) -> tuple[int, ...]:
        return tuple(torch.randperm(total, generator=self.rng)[:n].tolist())

    def expect(self, n: int) -> tuple[str, tuple[int, ...], float]:
        """Register a transfer on the peer; returns its id, source ids and the peer's CPU."""
        self.count += 1
        tid = f"bench-{self.count}"
        self.conn.send(("expect", (tid, self._ids(n, self.peer_blocks))))
        peer_cpu = self.conn.recv()
        return tid, self._ids(n, self.sender.cache.layout.num_blocks), peer_cpu

    def _peer_cpu(self) -> float:
        self.conn.send(("cpu", None))
        return self.conn.recv()

    def ours(self, n: int) -> Sample:
        tid, src, peer_cpu = self.expect(n)
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
    """Seconds to pack and land ``n`` random blocks frame by frame on one thread, no wire:
    the CPU the transport adds on top of gloo's own."""
    cache = bench.sender.cache
    plan = plan_chunks(
        n,
        cache.layout.num_layers,
        layer_block_bytes(cache.layout),
        TransferMode.WHOLE,
        bench.sender.config.chunk_bytes,
    )
    staging = Staging(cache.device)
    ids = block_index(bench._ids(n, cache.layout.num_blocks), cache.device)
    times = []
    for _ in range(reps + 1):  # the first run grows the frames
        start = time.perf_counter()
        for chunk in plan:
            frame = staging.frame(0, chunk.nbytes(layer_block_bytes(cache.layout)))
            pack(cache, ids, chunk, frame)
            unpack(cache, ids, chunk, frame)  # lands the same bytes where they were
        times.append(time.perf_counter() - start)
    return median(times[1:])


def bandwidth(bench: Bench, reps_for: dict[int, int]) -> list[dict[str, Any]]:
    rows = []
    for case in cases():
        reps = reps_for[case.nbytes]
        buf = torch.ones(case.nbytes // 4)
        bench.ours(case.blocks)  # warm-up: staging frames, pages, pair
        bench.gloo(case.nbytes, buf)
        ours: list[Sample] = []
        gloo: list[Sample] = []
        for _ in range(reps):  # interleaved, so a burst of load hits both alike
            ours.append(bench.ours(case.blocks))
            gloo.append(bench.gloo(case.nbytes, buf))
        copy = memcpy(case.nbytes, reps)
        copies = pack_land(bench, case.blocks, reps)
        ours_s, gloo_s = median([x.wall_s for x in ours]), median([x.wall_s for x in gloo])
        row = {
            "case": case.label,
            "blocks": case.blocks,
            "mib": case.nbytes / MIB,
            "ours_s": ours_s,
            "gloo_s": gloo_s,
            "memcpy_s": copy,
            "ours_gbps": case.nbytes / ours_s / 1e9,
            "gloo_gbps": case.nbytes / gloo_s / 1e9,
            "memcpy_gbps": case.nbytes / copy / 1e9,
            "pack_land_s": copies,
            "ours_cpu_s": median([x.cpu_s for x in ours]),
            "gloo_cpu_s": median([x.cpu_s for x in gloo]),
            "reps": reps,
            "ours_all_s": [x.wall_s for x in ours],
            "gloo_all_s": [x.wall_s for x in gloo],
        }
        row["ours_vs_gloo"] = row["ours_gbps"] / row["gloo_gbps"]
        rows.append(row)
        print(
            f"  {case.label:>16}: ours {row['ours_gbps']:.2f} GB/s, gloo "
            f"{row['gloo_gbps']:.2f} GB/s, memcpy {row['memcpy_gbps']:.2f} GB/s",
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
        ids = torch.tensor(bench._ids(n, cache.layout.num_blocks))
        start = time.perf_counter()
        for layer in range(layers):
            proxy(cache, layer, ids)
        compute_only.append(time.perf_counter() - start)

        tid, _, _ = bench.expect(n)
        spec = SendSpec(tid, bench.address, tuple(ids.tolist()), TransferMode.LAYERWISE)
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


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer reps, one overlap run")
    parser.add_argument("--chunk-mib", type=float, default=None, help="frame payload size")
    parser.add_argument("--depth", type=int, default=None, help="frames in flight per pair")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args()
    apply_offline_defaults()
    torch.set_num_threads(1)

    defaults = TransferConfig()
    config = TransferConfig(
        timeout_s=120.0,
        chunk_bytes=int(args.chunk_mib * MIB) if args.chunk_mib else defaults.chunk_bytes,
        pipeline_depth=args.depth or defaults.pipeline_depth,
    )
    largest = max(c.blocks for c in cases())
    num_blocks = largest + 64
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    peer = ctx.Process(target=_peer, args=(child, num_blocks, config), daemon=True)
    peer.start()
    address, raw_port = conn.recv()
    store = dist.TCPStore(
        "127.0.0.1", raw_port, None, False, timedelta(seconds=60), wait_for_workers=False
    )
    raw = _raw_pair(store, 1)
    cache = KVCache(KVLayout(**GEOMETRY, num_blocks=num_blocks))
    cache.tensor.normal_()
    sender = TorchDistSender(cache, MODEL, config)
    bench = Bench(conn, sender, PeerAddress.parse(address), raw, num_blocks)

    reps_for = {
        c.nbytes: (3 if args.quick else 7) if c.nbytes < 128 * MIB else (2 if args.quick else 4)
        for c in cases()
    }
    print(
        f"KV transfer benchmark ({'quick' if args.quick else 'full'}), chunk "
        f"{config.chunk_bytes / MIB:g} MiB, depth {config.pipeline_depth}, "
        f"block {BLOCK_BYTES // 1024} KiB",
        flush=True,
    )
    rows = bandwidth(bench, reps_for)
    whole_1k = next(r["ours_s"] for r in rows if r["case"] == "1024-token prompt")
    print("  layer-wise overlap (1k-token prompt)...", flush=True)
    lw = overlap(bench, whole_1k, 1 if args.quick else 2)

    print_table(
        [
            "KV",
            "MiB",
            "ours GB/s",
            "gloo GB/s",
            "memcpy GB/s",
            "ours/gloo",
            "ours ms",
            "gloo ms",
            "ours CPU ms",
            "gloo CPU ms",
            "pack+land ms",
        ],
        [
            [
                r["case"],
                r["mib"],
                r["ours_gbps"],
                r["gloo_gbps"],
                r["memcpy_gbps"],
                f"{100 * r['ours_vs_gloo']:.0f}%",
                1e3 * r["ours_s"],
                1e3 * r["gloo_s"],
                1e3 * r["ours_cpu_s"],
                1e3 * r["gloo_cpu_s"],
                1e3 * r["pack_land_s"],
            ]
            for r in rows
        ],
        title="KV transfer bandwidth (median; GB/s = 1e9 B/s)",
    )
    big = [r for r in rows if r["mib"] >= 16]
    worst = min(r["ours_vs_gloo"] for r in big)
    print(
        f"\ngoal ours >= 80% of gloo for >= 16 MiB: worst {100 * worst:.0f}% -> "
        f"{'PASS' if worst >= 0.8 else 'MISS'}"
    )
    print(
        f"layer-wise, 1k-token prompt ({lw['kv_mib']:.1f} MiB): compute "
        f"{lw['compute_s']:.2f} s alone, {lw['compute_with_transfer_s']:.2f} s with the "
        f"transfer ({100 * lw['compute_slowdown']:+.1f}%); whole transfer "
        f"{1e3 * whole_1k:.1f} ms, exposed after compute {1e3 * lw['exposed_s']:.1f} ms "
        f"-> hidden {100 * lw['hidden']:.0f}% "
        f"({'PASS' if lw['hidden'] >= 0.7 else 'MISS'} >= 70%)"
    )

    conn.send(("stop", None))
    conn.recv()
    sender.close()
    peer.join(timeout=10)
    payload = {
        "benchmark": "kv_transfer",
        "environment": environment_info(),
        "quick": args.quick,
        "chunk_bytes": config.chunk_bytes,
        "pipeline_depth": config.pipeline_depth,
        "block_bytes": BLOCK_BYTES,
        "bandwidth": rows,
        "layerwise": lw,
        "goals": {
            "ours_vs_gloo_min_ge_16mib": worst,
            "ours_vs_gloo_pass": worst >= 0.8,
            "layerwise_hidden": lw["hidden"],
            "layerwise_pass": lw["hidden"] >= 0.7,
        },
    }
    print(f"wrote {write_json(payload, 'kv_transfer', args.out)}")


if __name__ == "__main__":
    main()
