"""``pdserve profile``: measure this machine's cost profile and write it (JSON).

``pdserve profile --out FILE [--model DIR] [--dtype auto|fp32|bf16] [--threads N]
[--quick] [--e2e] [--block-size ...]`` loads the engine with those options, times its steps, a
real KV transfer pair, the router's decision and a gRPC round trip
(capacity/measure.py), and writes a :class:`capacity.profile.Profile` that
``pdserve simulate --profile FILE`` reads. ``--e2e`` adds the per-request overheads of
real stacks (capacity/measure_e2e.py); ``--overheads-only PROFILE --out FILE`` keeps
PROFILE's tables and re-measures only those (after a code change, say). Progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import replace
from typing import Any

DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPES.update({v: v for v in ("float32", "bfloat16", "float16")})


def add_parser(commands: Any) -> None:
    """Register ``profile`` on the ``pdserve`` parser."""
    command = commands.add_parser(
        "profile",
        help="measure prefill/decode/transfer/router costs here and write a profile",
        description=__doc__.splitlines()[0],
    )
    command.add_argument("--out", required=True, help="profile JSON to write")
    command.add_argument("--model", default=None, help="local HF checkpoint (default model)")
    command.add_argument("--dtype", default="auto", choices=sorted(DTYPES))
    command.add_argument("--threads", type=int, default=None, help="torch threads")
    command.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    command.add_argument("--quick", action="store_true", help="a small grid (seconds)")
    command.add_argument(
        "--e2e",
        action="store_true",
        help="also time short requests through a real 1P+1D stack: per-request overheads",
    )
    command.add_argument(
        "--overheads-only",
        metavar="PROFILE",
        default=None,
        help="keep PROFILE's tables; re-measure only its end-to-end overheads (as --e2e)",
    )
    engine = command.add_argument_group("engine options (as the profiled replica runs)")
    engine.add_argument("--block-size", type=int, default=16)
    engine.add_argument("--max-num-seqs", type=int, default=64)
    engine.add_argument("--max-num-batched-tokens", type=int, default=1024)
    engine.add_argument("--kv-cache-gib", type=float, default=1.0)
    engine.add_argument("--num-kv-blocks", type=int, default=None)
    engine.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8", "int8"))
    engine.add_argument("--quantization", default="none", choices=("none", "int8"))
    command.set_defaults(handler=_run)


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig keyword arguments from the parsed flags."""
    if args.threads is not None and args.threads < 1:
        raise SystemExit("pdserve profile: --threads must be >= 1")
    return {
        "model": args.model,
        "dtype": DTYPES[args.dtype],
        "device": args.device,
        "num_threads": args.threads,
        "block_size": args.block_size,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_gib": args.kv_cache_gib,
        "num_kv_blocks": args.num_kv_blocks,
        "kv_cache_dtype": args.kv_cache_dtype,
        "quantization": args.quantization,
    }


def _run(args: argparse.Namespace) -> int:
    from capacity.measure import MeasureOptions, measure_profile

    try:
        if args.overheads_only:
            profile = _refreshed(args)
        else:
            options = MeasureOptions(engine=engine_options(args), quick=args.quick, e2e=args.e2e)
            profile = measure_profile(options)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"pdserve profile: {exc}", file=sys.stderr)
        return 2
    profile.save(args.out)
    print(
        f"wrote {args.out}: {profile.hardware}, {profile.model} {profile.dtype}, "
        f"{len(profile.prefill.xs)}x{len(profile.prefill.ys)} prefill and "
        f"{len(profile.decode.xs)}x{len(profile.decode.ys)} decode points"
    )
    return 0


def _refreshed(args: argparse.Namespace) -> Any:
    """``--overheads-only PROFILE``: its tables as they are, the overheads measured now."""
    from capacity.measure import with_e2e_overheads
    from capacity.profile import Profile

    profile = Profile.load(args.overheads_only)
    fresh = with_e2e_overheads(profile, args.model, args.quick)
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    note = f"overheads re-measured by `pdserve profile --overheads-only` at {when}"
    return replace(fresh, notes=f"{profile.notes}; {note}" if profile.notes else note)
