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

Worker overheads: a profile measured with ``pdserve profile --e2e`` also has what real
stacks spend beyond the engine's steps (worker loops, the layer-wise sender sharing the
core, the KV hand-off and landing, streaming; fitted in capacity/measure_e2e.py). Here:

- a prefill step on a prefill replica (remote): ``+ prefill_step_overhead_s +
  prefill_token_overhead_s x new tokens``; a prefill step on a decode or colocated replica
  (local): the ``local_`` pair (the remote pair where a profile has none);
- a remote request's hand-off: ``handoff_token_overhead_s x prompt tokens``, on top of the
  transfer (:meth:`CostModel.handoff_s`);
- every decode step: ``+ decode_step_overhead_s``; the first decode step of a remotely
  prefilled request: ``+ first_decode_step_overhead_s`` on an idle replica, ``+
  join_running_batch_overhead_s`` into a running batch (:meth:`CostModel.first_decode_extra_s`);
- a remote request whose decode replica is mid-step as its KV lands: its first token
  ``busy_decode_handoff_s`` later (:meth:`CostModel.busy_decode_handoff_s`).

Absent, each is 0: a profile written from published figures prices the engine alone.
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
        extra = profile.overheads.get
        self._prefill_extra = extra("prefill_step_overhead_s", 0.0)
        self._prefill_token = extra("prefill_token_overhead_s", 0.0)
        self._local_extra = extra("local_prefill_step_overhead_s", self._prefill_extra)
        self._local_token = extra("local_prefill_token_overhead_s", self._prefill_token)
        self._handoff_token = extra("handoff_token_overhead_s", 0.0)
        self._decode_extra = extra("decode_step_overhead_s", 0.0)
        self._first_decode_extra = extra("first_decode_step_overhead_s", 0.0)
        self._join_running_extra = extra("join_running_batch_overhead_s", self._first_decode_extra)
        self._busy_handoff = extra("busy_decode_handoff_s", 0.0)

    def prefill_s(self, new_tokens: int, cached_tokens: int, local: bool = False) -> float:
        """Seconds for one prefill step computing ``new_tokens`` (the whole batch's), with
        ``cached_tokens`` of already-cached context attended; on a prefill replica, or
        ``local`` (a decode or colocated replica prefilling its own request)."""
        if new_tokens <= 0:
            return 0.0
        if local:
            extra = self._local_extra + self._local_token * new_tokens
        else:
            extra = self._prefill_extra + self._prefill_token * new_tokens
        return self._prefill(new_tokens, cached_tokens) + extra

    def decode_step_s(self, batch_size: int, total_context: int) -> float:
        """Seconds for one decode step of ``batch_size`` sequences holding
        ``total_context`` tokens of KV between them."""
        if batch_size <= 0:
            return 0.0
        return self._decode(batch_size, total_context) + self._decode_extra

    def mixed_step_s(
        self,
        new_tokens: int,
        cached_tokens: int,
        batch_size: int,
        total_context: int,
        local: bool = True,
    ) -> float:
        """Seconds for one engine step that prefills ``new_tokens`` and decodes
        ``batch_size`` sequences together (colocated workers, local prefill; ``local=False``
        for a prefill replica's steps): the two tables' costs, with the fixed per-step
        worker overhead paid once, since it is one forward pass."""
        prefill = self.prefill_s(new_tokens, cached_tokens, local)
        decode = self.decode_step_s(batch_size, total_context)
        if prefill and decode:
            fixed = self._local_extra if local else self._prefill_extra
            return prefill + decode - min(fixed, self._decode_extra)
        return prefill + decode

    def handoff_s(self, prompt_tokens: int) -> float:
        """Seconds a remote prefill's hand-off adds beyond the transfer fit (measured)."""
        return self._handoff_token * max(prompt_tokens, 0)

    def busy_decode_handoff_s(self) -> float:
        """Seconds a remote prefill's first token waits when its decode replica is mid-step
        as the KV lands (the worker's loop shares the process with the step; measured)."""
        return self._busy_handoff

    def first_decode_extra_s(self, into_running_batch: bool = False) -> float:
        """Seconds the first decode step of a remotely prefilled request adds (measured):
        joining an idle replica, or ``into_running_batch``."""
        return self._join_running_extra if into_running_batch else self._first_decode_extra

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
