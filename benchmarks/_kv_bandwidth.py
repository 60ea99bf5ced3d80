"""Bandwidth part of the KV transfer benchmark: ours vs raw gloo vs memcpy, per size.

Per size (1, 16, 64, 256 MiB of KV rounded to whole blocks, and the KV of a 128-, 1k- and
4k-token prompt), whole-mode transfers, interleaved rep by rep (every order and id kind,
then gloo), medians over the reps; see :mod:`benchmarks.kv_transfer` for what each column
means and :mod:`benchmarks._kv_pair` for the two processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks._block_ids import mean_run
from benchmarks._common import median
from benchmarks._kv_pair import BLOCK_BYTES, Bench, Sample
from engine.kv_cache import ORDERS
from kv_transfer.packing import Staging, layer_block_bytes, pack_staged, staged_ids, unpack_staged
from kv_transfer.segments import direct_blocks, long_runs, overlaps, plan_frames
from kv_transfer.types import TransferMode

MIB = 1 << 20
IDS = ("contiguous", "realistic", "scattered")


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


def segments(src: tuple[int, ...], dst: tuple[int, ...]) -> int:
    """Stretches that are one run on both sides (direct pieces if long enough)."""
    return len(overlaps(long_runs(src, 1, len(src)), long_runs(dst, 1, len(dst))))


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
