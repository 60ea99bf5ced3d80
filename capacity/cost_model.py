"""Fast cost lookups over a :class:`capacity.profile.Profile`, for the simulator.

Every method is pure and cheap (a bisect per axis and a few multiplies): the simulator
calls them millions of times. Rules, the same for both step grids:

- Between grid points: bilinear interpolation; exact at grid points.
- The grid is made non-decreasing along both axes first (a running max), because a bigger
  batch or a longer context never costs less; without this, measurement noise makes the
  simulator prefer odd batch sizes. A measured grid is already (nearly) monotone, so this
  changes at most a few noisy points.
- Below the first grid point of an axis: the first point's value (a step has a fixed floor
  cost: launching the layers, host work).
- Above the last grid point: linear extrapolation with the last segment's slope (compute
  and KV reads grow linearly with tokens); an axis with one point extrapolates flat.
  Measure a grid that covers the workload: far extrapolation is a guess.

Transfers use the profile's fit, ``latency + bytes / bandwidth``.

Worker overheads: a profile measured with ``pdserve profile --e2e`` also has
``overheads["prefill_step_overhead_s"]`` / ``["decode_step_overhead_s"]`` — what a real
1P+1D stack spends per step beyond the engine's step (worker loops, KV handshake and
landing, streaming; capacity/measure_e2e.py). They are added to every prefill / decode
step here, so the simulator charges them without knowing about them; absent, they are 0.
"""

from __future__ import annotations

import bisect

from capacity.profile import Grid2D, Profile


def _monotone(grid: Grid2D) -> list[list[float]]:
    """``grid.seconds`` with a running max along both axes."""
    rows = [list(row) for row in grid.seconds]
    for i, row in enumerate(rows):
        for j in range(1, len(row)):
            row[j] = max(row[j], row[j - 1])
        if i:
            prev = rows[i - 1]
            for j in range(len(row)):
                row[j] = max(row[j], prev[j])
    return rows


def _locate(axis: tuple[int, ...], value: float) -> tuple[int, float]:
    """``(i, t)``: ``value`` sits at ``axis[i] + t * (axis[i+1] - axis[i])``.

    ``t`` is 0 below the first point and may exceed 1 past the last (extrapolation on the
    last segment). A one-point axis gives ``(0, 0.0)`` everywhere."""
    n = len(axis)
    if n == 1 or value <= axis[0]:
        return 0, 0.0
    i = min(bisect.bisect_right(axis, value) - 1, n - 2)
    return i, (value - axis[i]) / (axis[i + 1] - axis[i])


class _Table:
    """One 2-D step-cost table, precomputed for lookups."""

    __slots__ = ("nx", "ny", "rows", "xs", "ys")

    def __init__(self, grid: Grid2D) -> None:
        self.xs = grid.xs
        self.ys = grid.ys
        self.rows = _monotone(grid)
        self.nx = len(grid.xs)
        self.ny = len(grid.ys)

    def __call__(self, x: float, y: float) -> float:
        i, tx = _locate(self.xs, x)
        j, ty = _locate(self.ys, y)
        rows = self.rows
        i1 = i + 1 if self.nx > 1 else i
        j1 = j + 1 if self.ny > 1 else j
        low = rows[i][j] + ty * (rows[i][j1] - rows[i][j])
        high = rows[i1][j] + ty * (rows[i1][j1] - rows[i1][j])
        return max(low + tx * (high - low), 0.0)


class CostModel:
    """What one replica's work costs, from a profile."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._prefill = _Table(profile.prefill)
        self._decode = _Table(profile.decode)
        self._latency = profile.transfer.latency_s
        self._inv_bandwidth = 1.0 / profile.transfer.bandwidth_bytes_per_s
        self._kv_bytes_per_token = profile.kv_bytes_per_token
        self._router_s = profile.router_decision_s
        self._prefill_extra = profile.overheads.get("prefill_step_overhead_s", 0.0)
        self._decode_extra = profile.overheads.get("decode_step_overhead_s", 0.0)

    def prefill_s(self, new_tokens: int, cached_tokens: int) -> float:
        """Seconds for one prefill step computing ``new_tokens`` (the whole batch's), with
        ``cached_tokens`` of already-cached context attended."""
        if new_tokens <= 0:
            return 0.0
        return self._prefill(new_tokens, cached_tokens) + self._prefill_extra

    def decode_step_s(self, batch_size: int, total_context: int) -> float:
        """Seconds for one decode step of ``batch_size`` sequences holding
        ``total_context`` tokens of KV between them."""
        if batch_size <= 0:
            return 0.0
        return self._decode(batch_size, total_context) + self._decode_extra

    def mixed_step_s(
        self, new_tokens: int, cached_tokens: int, batch_size: int, total_context: int
    ) -> float:
        """Seconds for one engine step that prefills ``new_tokens`` and decodes
        ``batch_size`` sequences together (colocated workers, local prefill): the two
        tables' costs, with the per-step worker overhead paid once, since it is one
        forward pass."""
        prefill = self.prefill_s(new_tokens, cached_tokens)
        decode = self.decode_step_s(batch_size, total_context)
        if prefill and decode:
            return prefill + decode - min(self._prefill_extra, self._decode_extra)
        return prefill + decode

    def transfer_s(self, num_bytes: int) -> float:
        """Seconds to move ``num_bytes`` of KV from a prefill to a decode replica."""
        if num_bytes <= 0:
            return 0.0
        return self._latency + num_bytes * self._inv_bandwidth

    def router_decision_s(self) -> float:
        """Seconds the router spends deciding one request (median)."""
        return self._router_s

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of KV cache ``tokens`` tokens occupy (all layers, K and V)."""
        return max(tokens, 0) * self._kv_bytes_per_token

    def overhead_s(self, name: str, default: float = 0.0) -> float:
        """A per-request overhead from the profile (e.g. ``"rpc_s"``), or ``default``."""
        return self.profile.overheads.get(name, default)
