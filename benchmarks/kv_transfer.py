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
``python -m benchmarks.allocator``.

Layer-wise overlap, 1k-token prompt, realistic ids, per order (:mod:`benchmarks._kv_overlap`):
the share of the transfer hidden behind a per-layer compute proxy. Goal: hidden >= 70 %.

KV dtype (:mod:`benchmarks._kv_dtype`): a 4k-token prompt's KV, whole mode, per KV cache
dtype — bf16, fp8, int8 (``kv_cache_dtype``; quantized rows carry their scale) and fp32 —
bytes, wall time and both as a share of bf16's. Goal: fp8 <= 0.55x of bf16 in bytes and
time. ``--kv-dtype-only`` runs just this table.

Run: ``python -m benchmarks.kv_transfer [--quick] [--kv-dtype-only] [--chunk-mib N]
[--depth N] [--direct-kib N] [--out PATH]`` (``make bench-kv``). Results:
``benchmarks/results/kv_transfer.json`` (``_quick`` suffix). The bandwidth cases are
:mod:`benchmarks._kv_bandwidth`.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from benchmarks import _kv_dtype
from benchmarks._common import announce, bench_parser, print_table, save, use_checkout_defaults
from benchmarks._kv_bandwidth import IDS, MIB, bandwidth, cases
from benchmarks._kv_overlap import overlap
from benchmarks._kv_pair import BLOCK_BYTES, CACHE_BLOCKS, WARMUP, Bench
from engine.kv_cache import ORDERS
from kv_transfer.types import TransferConfig

JUDGED = "page_first"  # the order whose realistic column the 80 % goal is judged on


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


def report_dtypes(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The KV-dtype table and its goal line."""
    print_table(
        ["KV dtype", "MiB", "ms", "GB/s", "bytes vs bf16", "time vs bf16"],
        [
            [r["kv_dtype"], r["mib"], r["ms"], r["gbps"], r["bytes_vs_bf16"], r["time_vs_bf16"]]
            for r in rows
        ],
        title=f"KV dtype: a {_kv_dtype.PROMPT_TOKENS}-token prompt's KV, whole mode, "
        "layer-first, medians",
    )
    result = _kv_dtype.goal(rows)
    print(
        f"goal fp8 <= {_kv_dtype.GOAL}x of bf16: bytes {result['fp8_bytes_vs_bf16']:.3f}x, "
        f"time {result['fp8_time_vs_bf16']:.3f}x -> {'PASS' if result['pass'] else 'MISS'}"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, quick="fewer reps, one overlap run")
    parser.add_argument("--chunk-mib", type=float, default=None, help="frame payload size")
    parser.add_argument("--depth", type=int, default=None, help="frames in flight per pair")
    parser.add_argument(
        "--direct-kib", type=float, default=None, help="smallest piece sent in place"
    )
    parser.add_argument(
        "--kv-dtype-only", action="store_true", help="only the KV-dtype table (4k-token prompt)"
    )
    args = parser.parse_args(argv)
    use_checkout_defaults()
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
    context = announce()
    dtype_reps = 3 if args.quick else 9
    if args.kv_dtype_only:
        dtype_rows = _kv_dtype.measure(config, dtype_reps)
        payload = {**context, "kv_dtype": dtype_rows, "goals": report_dtypes(dtype_rows)}
        save("kv_transfer_dtype", payload, args)
        return 0
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
    print("  KV dtype (4k-token prompt)...", flush=True)
    dtype_rows = _kv_dtype.measure(config, dtype_reps)
    goals["kv_dtype"] = report_dtypes(dtype_rows)
    payload = {
        **context,
        "chunk_bytes": config.chunk_bytes,
        "pipeline_depth": config.pipeline_depth,
        "direct_min_bytes": config.direct_min_bytes,
        "block_bytes": BLOCK_BYTES,
        "cache_blocks": CACHE_BLOCKS,
        "cache_orders": list(ORDERS),
        "realistic_warmup_requests": WARMUP,
        "bandwidth": rows,
        "layerwise": lws,
        "kv_dtype": dtype_rows,
        "goals": goals,
    }
    save("kv_transfer", payload, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
