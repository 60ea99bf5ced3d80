"""Recent latency, as a worker's load reports carry it to the routers (TTFT, ITL)."""

from __future__ import annotations

import time
from collections import deque


class LatencyWindow:
    """Mean (or a quantile) of the samples of the last ``window_s`` seconds (at most
    ``max_samples``)."""

    def __init__(self, window_s: float = 10.0, max_samples: int = 1024) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def add(self, seconds: float) -> None:
        self._samples.append((time.monotonic(), seconds))

    def mean_ms(self) -> float | None:
        horizon = time.monotonic() - self._window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()
        if not self._samples:
            return None
        return 1000.0 * sum(s for _, s in self._samples) / len(self._samples)

    def percentile_ms(self, q: float) -> float | None:
        """The ``q`` quantile (0..1, nearest rank) of the window's samples, in ms."""
        self.mean_ms()  # drops the expired samples
        if not self._samples:
            return None
        ordered = sorted(s for _, s in self._samples)
        rank = min(max(int(q * len(ordered) + 0.5) - 1, 0), len(ordered) - 1)
        return 1000.0 * ordered[rank]
