"""Recent latency quantiles (TTFT p90, ITL p90) from a worker's Prometheus histograms.

A worker already measures every TTFT and ITL into cumulative histograms
(``pdserve_ttft_seconds``, ``pdserve_itl_seconds``). The autoscaling policies need the p90
of the *last few seconds*, which is what PromQL's
``histogram_quantile(0.9, rate(x_bucket[10s]))`` computes: the difference of two
snapshots of the cumulative bucket counts, interpolated linearly inside the bucket
that holds the quantile. :class:`RecentQuantile` keeps the snapshots;
:func:`bucket_quantile` is the pure arithmetic.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence

from prometheus_client import Histogram


def bucket_quantile(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float | None:
    """The ``q`` quantile of a histogram, or None if it holds no observations.

    ``bounds`` are the buckets' upper bounds (ascending, the last may be +Inf) and
    ``counts`` the *cumulative* counts, as Prometheus stores them. A quantile that falls
    in the +Inf bucket is reported as the largest finite bound, like PromQL does.
    """
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if len(bounds) != len(counts) or not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank and count > lower_count:
            if math.isinf(bound):
                return lower_bound
            fraction = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * fraction
        lower_bound, lower_count = bound, count
    return lower_bound


class RecentQuantile:
    """Quantiles of one (label-less) histogram over the last ``window_s`` seconds.

    Call :meth:`quantile` periodically (every Serve metrics record); each call takes a
    snapshot, so the window is as fine as the calling period.
    """

    def __init__(self, histogram: Histogram, window_s: float = 10.0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self._histogram = histogram
        self._window_s = window_s
        self._snapshots: deque[tuple[float, tuple[float, ...]]] = deque()

    def quantile(self, q: float, now: float | None = None) -> float | None:
        """Seconds; None when nothing was observed inside the window."""
        now = time.monotonic() if now is None else now
        bounds, counts = self._read()
        self._snapshots.append((now, counts))
        # Keep the newest snapshot at or before the window's start as the baseline.
        while len(self._snapshots) > 1 and self._snapshots[1][0] <= now - self._window_s:
            self._snapshots.popleft()
        _, base = self._snapshots[0]
        recent = [c - b for c, b in zip(counts, base, strict=True)]
        if len(self._snapshots) == 1:  # first call: everything so far is "recent"
            recent = list(counts)
        return bucket_quantile(q, bounds, recent)

    def _read(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        bounds: list[float] = []
        counts: list[float] = []
        for family in self._histogram.collect():
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bounds.append(float(sample.labels["le"]))
                    counts.append(float(sample.value))
        return tuple(bounds), tuple(counts)
