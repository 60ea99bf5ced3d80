"""The engine's block allocator: how long its runs of consecutive block ids stay under
churn, and what keeping them costs in prefix-cache hits.

Runs are what the KV transfer is fast on: a run of blocks goes from cache to cache as
2 x layers messages, every extra run adds as many, and runs shorter than the transfer's
``direct_min_bytes`` are gathered and scattered (``kv_transfer/segments.py``). The
``BlockManager`` (``engine/free_blocks.py``) hands out runs. This drives it the two ways
the workers do (``benchmarks/_block_ids.py``), for the same requests in the same run:

* prefill side: prompts of 16-1024 tokens prefilled in 512-token chunks with the prefix
  cache on, some opening with one of 8 shared 256/512-token system prompts. Reported: the
  mean run of each prompt's *new* blocks (a cached prefix is a run of its own), the share
  of prompts whose new blocks are one run, and prefix hits as a share of prompt tokens —
  with window eviction (the default: allocations of >= ``RUN_EVICTION_MIN_BLOCKS``) and
  without it (strict LRU; the extents and chunk placement stay).
* decode side: raw reservations of 1-64 blocks, about half released before the next:
  the mean run of each reservation.

Measured after a warm-up of ``--requests`` requests, over the next ``--requests``.
Run: ``python -m benchmarks.allocator [--quick] [--requests N] [--blocks N] [--out PATH]``
(``make bench-alloc``). Results: ``benchmarks/results/allocator.json`` (``_quick`` suffix).
"""

from __future__ import annotations

import random
from typing import Any

from benchmarks._block_ids import DecodeSide, PrefillSide, mean_run, run_count
from benchmarks._common import announce, bench_parser, print_table, save
from engine.block_manager import RUN_EVICTION_MIN_BLOCKS

NO_WINDOW = 1 << 30  # run_eviction_min_blocks that no allocation reaches: strict LRU


def prefill_side(blocks: int, requests: int, run_eviction_min_blocks: int) -> dict[str, Any]:
    side = PrefillSide(blocks, random.Random(0), requests, run_eviction_min_blocks)
    sizes = random.Random(1)
    new: list[tuple[int, ...]] = []
    cached = total = 0
    for _ in range(requests):
        n = sizes.randint(1, 64)
        ids = side.draw(n)
        cached += side.last_cached_blocks
        total += n
        if ids[side.last_cached_blocks :]:
            new.append(ids[side.last_cached_blocks :])
    return {
        "mean_run_blocks": mean_run(new),
        "one_run_share": sum(run_count(ids) == 1 for ids in new) / len(new),
        "prefix_hit_share": cached / total,
    }


def decode_side(blocks: int, requests: int) -> dict[str, Any]:
    side = DecodeSide(blocks, random.Random(0), requests)
    sizes = random.Random(1)
    return {"mean_run_blocks": mean_run([side.draw(sizes.randint(1, 64)) for _ in range(requests)])}


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, quick="300 requests instead of 3000")
    parser.add_argument("--requests", type=int, default=None, help="warm-up, then measured")
    parser.add_argument("--blocks", type=int, default=1024, help="cache size in blocks")
    args = parser.parse_args(argv)
    args.requests = args.requests or (300 if args.quick else 3000)
    context = announce()

    window = prefill_side(args.blocks, args.requests, RUN_EVICTION_MIN_BLOCKS)
    strict = prefill_side(args.blocks, args.requests, NO_WINDOW)
    decode = decode_side(args.blocks, args.requests)
    rows = [
        [f"window eviction (>= {RUN_EVICTION_MIN_BLOCKS} blocks)", window],
        ["strict LRU", strict],
    ]
    print_table(
        ["prefill side", "mean run (blocks)", "in one run", "prefix hits"],
        [
            [
                name,
                r["mean_run_blocks"],
                f"{r['one_run_share']:.0%}",
                f"{r['prefix_hit_share']:.1%}",
            ]
            for name, r in rows
        ],
        title=f"{args.blocks}-block cache, {args.requests} requests after as many to warm up",
    )
    print(f"decode side: mean run of a reservation {decode['mean_run_blocks']:.1f} blocks")
    payload = {
        **context,
        "blocks": args.blocks,
        "requests": args.requests,
        "run_eviction_min_blocks": RUN_EVICTION_MIN_BLOCKS,
        "prefill_window_eviction": window,
        "prefill_strict_lru": strict,
        "decode": decode,
    }
    save("allocator", payload, args)


if __name__ == "__main__":
    main()
