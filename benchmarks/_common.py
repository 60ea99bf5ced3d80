"""What every benchmark module shares: its command line, statistics, tables and results.

    parser = bench_parser(__doc__, quick="fewer reps")      # --quick and --out
    args = parser.parse_args(argv)
    context = announce()                                    # defaults, warning, environment
    ...
    save("kv_transfer", {**context, ...}, args)             # results/kv_transfer[_quick].json

Torch-free at import time. Results land in ``benchmarks/results/<name>.json`` (``_quick``
suffix for a ``--quick`` run) unless ``--out`` gives a path. The statistics and the
environment block are the load generator's (:mod:`loadgen.summary`, :mod:`loadgen.machine`),
so an end-to-end run and a micro-benchmark compute and record them the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from common.env import apply_offline_defaults
from loadgen.machine import busy_machine_warning, environment_info
from loadgen.summary import percentile

RESULTS_DIR = Path(__file__).resolve().parent / "results"

T = TypeVar("T")

# --------------------------------------------------------------------------- command line


def bench_parser(doc: str, quick: str) -> argparse.ArgumentParser:
    """An argument parser described by ``doc``'s first line, with the flags every
    benchmark has: ``--quick`` (``quick`` says what it shrinks) and ``--out``."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    return parser


def use_checkout_defaults() -> None:
    """Offline and gloo on loopback, as every entry point sets them; the model cache is the
    one they all use (``common.env.cache_dir()``)."""
    apply_offline_defaults()


def announce() -> dict[str, Any]:
    """The checkout's defaults, a warning if the machine is busy, and the block every
    result JSON starts with (call it once the benchmark has set its torch threads)."""
    use_checkout_defaults()
    warning = busy_machine_warning()
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return {"environment": environment_info(), "busy_machine_warning": warning}


def save(name: str, payload: dict[str, Any], args: argparse.Namespace) -> Path:
    """Write ``payload`` to ``--out`` or ``results/<name>[_quick].json``; print the path."""
    quick = bool(getattr(args, "quick", False))
    target = args.out or RESULTS_DIR / f"{name}{'_quick' if quick else ''}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": name, "quick": quick, **payload}
    target.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"\nwrote {target}")
    return target


# --------------------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of an empty sequence")
    return float(statistics.median(values))


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": sum(values) / len(values),
        "max": max(values),
    }


def round_stats(values: Sequence[float], rounds: int) -> dict[str, Any]:
    """Percentiles of each of ``rounds`` consecutive slices, then the median across them
    (top level), so one burst of load from another process does not decide the result;
    ``rounds_p99`` keeps each slice's p99 and ``all`` the percentiles of every sample."""
    size = len(values) // rounds
    per_round = [_stats(values[i * size : (i + 1) * size]) for i in range(rounds)]
    merged: dict[str, Any] = {
        key: statistics.median(r[key] for r in per_round) for key in ("p50", "p90", "p99", "mean")
    }
    merged["rounds_p99"] = [r["p99"] for r in per_round]
    merged["all"] = _stats(values)
    return merged


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """Run ``fn`` once; return its result and the wall time in seconds."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


# --------------------------------------------------------------------------- output


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table; numbers right-aligned, floats with 2 decimals."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows) if rows else False
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> None:
    if title:
        print(f"\n{title}")
    print(format_table(headers, rows))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


@contextlib.contextmanager
def log_directory(path: str | Path | None, keep: bool = False) -> Iterator[Path]:
    """Where child processes log: ``path`` if given (kept); else a temp dir removed on
    success unless ``keep``, and kept when the block raises, so the logs can be read."""
    if path is not None:
        target = Path(path)
        target.mkdir(parents=True, exist_ok=True)
        yield target
        return
    target = Path(tempfile.mkdtemp(prefix="pdserve-bench-"))
    try:
        yield target
    except BaseException:
        print(f"process logs kept in {target}", file=sys.stderr)
        raise
    if keep:
        print(f"process logs kept in {target}")
    else:
        shutil.rmtree(target, ignore_errors=True)
