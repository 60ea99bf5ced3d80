"""KV transfer bandwidth and layer-wise overlap, against the transport's and machine's limits.

Two processes on loopback (``benchmarks/_kv_pair.py``): this one is the prefill side, a
spawned peer the decode side, with one ``TorchDistSender`` / ``TorchDistReceiver`` per KV
cache memory order — ``layer_first`` (the engines' default, built for layer-wise sends)
and ``page_first`` (built for whole-request sends; ``engine/kv_cache.py``) — each over its
own cache. All caches have the default model's KV geometry (SmolLM2-135M: 30 layers, 3 KV
heads, head_dim 64, fp32, 16-token blocks, 720 KiB per block, 12 KiB of K or V per block
and layer) and 1024 blocks; each process runs one torch thread, like workers on the 2-core
local cluster.

Bandwidth, per size (1, 16, 64, 256 MiB of KV rounded to whole blocks, and the KV of a
128-, 1k- and 4k-token prompt), whole-mode transfers, measured in the same run and
interleaved rep by rep (every order and id kind, then gloo):

* ``realistic``  end to end: ``send()`` until the sender's transfer is DONE, i.e. the
  receiver has landed every block in its (different) destination ids and said so —
  pack, send, land and the handshakes. Source ids are a prompt's blocks in a prefill
  worker's prefix-caching cache, destination ids a reservation in a decode worker's
  cache, each side's engine ``BlockManager`` driven the way that worker drives it and
  warmed up by ``WARMUP`` requests (``benchmarks/_block_ids.py``). Page-first caches send
  each segment (stretch that is one run on both sides) as one message; layer-first ones
  send a long segment as 2 × 30 messages and stage short ones. **The 80 % goal is judged
  on this case with page-first caches**: the order to run whole-request transfers with
  (``kv_cache_order: page_first``); the layer-first default is for layer-wise ones.
* ``contiguous``, ``scattered``  the same with one run on each side, or with both sides'
  ids a random permutation (no two neighbours adjacent: page-first sends every block as
  its own message, layer-first gathers, stages and scatters them all). Shown, not judged.
* ``gloo``       the transport's limit: a plain gloo pair between the same two processes
  sends one contiguous tensor of the same size; the receiver answers with a one-element
  ack (so both sides include the completion round trip).
* ``memcpy``     the machine's limit: one local ``copy_`` of the same size.

GB/s are 10^9 bytes per second of KV, medians over the reps; the ratio columns are ours as
a share of gloo's rate. Goal: realistic page-first >= 80 % of gloo for sizes >= 16 MiB. The
CPU columns add up the CPU time of both processes (all threads) during a transfer;
``pack+land`` is the gather and scatter of the scattered case (layer-first) done on one
thread with no wire — gloo's CPU plus that is the floor of the staged path on a CPU-bound
box. ``segs`` is the median number of segments of the realistic transfers; the JSON also
has the mean run length of their source and destination ids.

How long the engine's runs stay under churn, and what that costs in prefix hits, is
``benchmarks/allocator.py``.

Layer-wise overlap, 1k-token prompt, realistic ids, per order: a per-layer compute proxy
with SmolLM2's shapes (RMSNorm, q/k/v/o projections, causal SDPA with 9 query / 3 KV
heads, SiLU MLP 576→1536) computes each layer and writes its K/V into the source blocks,
then marks the layer ready. The exposed transfer time is what is left after the last
layer is computed (until the receiver has landed everything); ``hidden = 1 - exposed /
whole-transfer time`` (that order's realistic whole transfer). Goal: hidden >= 70 %.

Run: ``python benchmarks/kv_transfer.py [--quick] [--chunk-mib N] [--depth N]
[--direct-kib N] [--out PATH]``. Results: ``benchmarks/results/kv_transfer.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks._block_ids import mean_run
from benchmarks._common import (
    busy_machine_warning,
    environment_info,
    median,
    print_table,
    write_json,
)
from benchmarks._kv_pair import (
    BLOCK_BYTES,
    CACHE_BLOCKS,
    GEOMETRY,
    WARMUP,
    Bench,
    Sample,
)
from common.env import apply_offline_defaults
from engine.kv_cache import ORDERS, KVCache
from kv_transfer.packing import Staging, layer_block_bytes, pack_staged, staged_ids, unpack_staged
from kv_transfer.segments import direct_blocks, long_runs, overlaps, plan_frames
from kv_transfer.types import SendSpec, TransferConfig, TransferMode, TransferState

MIB = 1 << 20
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 576, 9, 3, 64, 1536  # SmolLM2-135M
IDS = ("contiguous", "realistic", "scattered")
JUDGED = "page_first"  # the order whose realistic column the 80 % goal is judged on


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


# --------------------------------------------------------------------------- measurements


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
    no wire: the CPU the staged path adds on top of gloo's own (layer-first cache)."""
    sender = bench.senders["layer_first"]
    cache, config = sender.cache, sender.config
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
        for kind in IDS:  # warm-up: staging frames, pages, pairs
            for order in ORDERS:
                bench.ours(order, *bench.ids(kind, case.blocks))
        bench.gloo(case.nbytes, buf)
        ours: dict[tuple[str, str], list[Sample]] = {(o, k): [] for o in ORDERS for k in IDS}
        gloo: list[Sample] = []
        # Drawn up front: replaying the allocator's churn is a CPU burst of its own.
        draws = [{kind: bench.ids(kind, case.blocks) for kind in IDS} for _ in range(reps)]
        segs = [segments(*ids["realistic"]) for ids in draws]
        for ids in draws:  # interleaved, so a burst of load hits all alike
            for kind in IDS:
                for order in ORDERS:
                    ours[order, kind].append(bench.ours(order, *ids[kind]))
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
        for (order, kind), samples in ours.items():
            wall = median([x.wall_s for x in samples])
            key = f"{order}_{kind}"
            row[f"{key}_s"] = wall
            row[f"{key}_gbps"] = case.nbytes / wall / 1e9
            row[f"{key}_vs_gloo"] = gloo_s / wall
            row[f"{key}_cpu_s"] = median([x.cpu_s for x in samples])
            row[f"{key}_all_s"] = [x.wall_s for x in samples]
        rows.append(row)
        print(
            f"  {case.label:>17}: gloo {row['gloo_gbps']:.2f} GB/s, memcpy "
            f"{row['memcpy_gbps']:.2f}; realistic ({row['segments']:g} segments) "
            + ", ".join(f"{o} {100 * row[f'{o}_realistic_vs_gloo']:.0f}%" for o in ORDERS)
            + " of gloo",
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


def overlap(bench: Bench, order: str, whole_s: float, runs: int) -> dict[str, Any]:
    tokens = 1024
    n = -(-tokens // GEOMETRY["block_size"])
    proxy = LayerProxy(tokens)
    sender = bench.senders[order]
    layers = GEOMETRY["num_layers"]
    compute_only, exposed, compute_with = [], [], []
    for _ in range(runs):
        src, dst = bench.ids("realistic", n)
        ids = torch.tensor(src)
        start = time.perf_counter()
        for layer in range(layers):
            proxy(sender.cache, layer, ids)
        compute_only.append(time.perf_counter() - start)

        tid, _ = bench.expect(order, dst)
        spec = SendSpec(tid, bench.addresses[order], src, TransferMode.LAYERWISE)
        start = time.perf_counter()
        transfer = sender.send(spec, lambda _: None)
        for layer in range(layers):
            proxy(sender.cache, layer, ids)
            transfer.mark_layer_ready(layer)
        computed = time.perf_counter()
        if transfer.wait(120) is not TransferState.DONE:
            raise RuntimeError(f"layer-wise transfer failed: {transfer.error}")
        exposed.append(time.perf_counter() - computed)
        compute_with.append(computed - start)
    result = {
        "order": order,
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


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def report(rows: list[dict[str, Any]], lws: dict[str, dict[str, Any]]) -> dict:
    short = {"layer_first": "LF", "page_first": "PF"}
    ratio_cols = [(o, k) for o in ORDERS for k in IDS]
    print_table(
        ["KV", "MiB", "segs", "gloo GB/s", "memcpy GB/s"]
        + [f"{short[o]} {k[:6]}" + (" *" if (o, k) == (JUDGED, "realistic") else "")
           for o, k in ratio_cols],
        [
            [r["case"], r["mib"], r["segments"], r["gloo_gbps"], r["memcpy_gbps"]]
            + [_pct(r[f"{o}_{k}_vs_gloo"]) for o, k in ratio_cols]
            for r in rows
        ],
        title="KV transfer, ours as % of raw gloo (medians; LF = layer-first cache, PF = "
        "page-first; * = judged)",
    )  # fmt: skip
    print_table(
        ["KV", "gloo ms", "gloo CPU ms", "pack+land ms"]
        + [f"{short[o]} realistic ms" for o in ORDERS]
        + [f"{short[o]} realistic CPU ms" for o in ORDERS]
        + [f"{short[o]} scattered ms" for o in ORDERS],
        [
            [r["case"], 1e3 * r["gloo_s"], 1e3 * r["gloo_cpu_s"], 1e3 * r["pack_land_s"]]
            + [1e3 * r[f"{o}_realistic_s"] for o in ORDERS]
            + [1e3 * r[f"{o}_realistic_cpu_s"] for o in ORDERS]
            + [1e3 * r[f"{o}_scattered_s"] for o in ORDERS]
            for r in rows
        ],
        title="Wall and CPU time (both processes) per transfer, medians",
    )  # fmt: skip
    big = [r for r in rows if r["mib"] >= 16]
    worst = {(o, k): min(r[f"{o}_{k}_vs_gloo"] for r in big) for o, k in ratio_cols}
    judged = worst[JUDGED, "realistic"]
    print(
        f"\ngoal ours >= 80% of gloo for >= 16 MiB, judged on realistic ids, {JUDGED}: "
        f"worst {_pct(judged)} -> {'PASS' if judged >= 0.8 else 'MISS'}  (others, not "
        "judged: " + ", ".join(f"{o} {k} {_pct(v)}" for (o, k), v in worst.items()) + ")"
    )
    for order, lw in lws.items():
        print(
            f"layer-wise, 1k-token prompt, {order} ({lw['kv_mib']:.1f} MiB, realistic ids): "
            f"compute {lw['compute_s']:.2f} s alone, {lw['compute_with_transfer_s']:.2f} s "
            f"with the transfer ({100 * lw['compute_slowdown']:+.1f}%); whole transfer "
            f"{1e3 * lw['whole_transfer_s']:.1f} ms, exposed after compute "
            f"{1e3 * lw['exposed_s']:.1f} ms -> hidden {_pct(lw['hidden'])} "
            f"({'PASS' if lw['hidden'] >= 0.7 else 'MISS'} >= 70%)"
        )
    return {
        "judged_on": f"{JUDGED} realistic",
        "worst_vs_gloo_ge_16mib": {f"{o}_{k}": v for (o, k), v in worst.items()},
        "bandwidth_pass": judged >= 0.8,
        "layerwise_hidden": {order: lw["hidden"] for order, lw in lws.items()},
        "layerwise_pass": all(lw["hidden"] >= 0.7 for lw in lws.values()),
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
    bench = Bench(config)

    # Medians of enough reps that one burst of load on the shared 2-core box cannot move
    # them: with 7 / 4 reps, two cases with the same plan differed by up to 15 %.
    reps_for = {
        c.nbytes: (3 if args.quick else 15) if c.nbytes < 128 * MIB else (2 if args.quick else 7)
        for c in cases()
    }
    print(
        f"KV transfer benchmark ({'quick' if args.quick else 'full'}), chunk "
        f"{config.chunk_bytes / MIB:g} MiB, depth {config.pipeline_depth}, direct pieces "
        f">= {config.direct_min_bytes / 1024:g} KiB, block {BLOCK_BYTES // 1024} KiB, "
        f"cache orders {', '.join(ORDERS)}",
        flush=True,
    )
    rows = bandwidth(bench, reps_for)
    k1 = next(r for r in rows if r["case"] == "1024-token prompt")
    lws = {}
    for order in ORDERS:
        print(f"  layer-wise overlap (1k-token prompt, {order})...", flush=True)
        lws[order] = overlap(bench, order, k1[f"{order}_realistic_s"], 1 if args.quick else 2)
    goals = report(rows, lws)
    bench.close()
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
        "cache_orders": list(ORDERS),
        "realistic_warmup_requests": WARMUP,
        "bandwidth": rows,
        "layerwise": lws,
        "goals": goals,
    }
    print(f"wrote {write_json(payload, 'kv_transfer', args.out)}")


if __name__ == "__main__":
    main()
