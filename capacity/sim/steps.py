"""Decode steps in runs: the time of ``m`` consecutive steps of a fixed batch, in closed form.

Between two changes of a decode batch (a join, a finish) every step has the same batch
size ``B`` and the batch's total context grows by ``B`` per step, so step ``i`` of a run
starting at context ``C0`` costs ``g(C0 + i*B)`` with ``g = cost.decode_step_s(B, .)``.
The cost model interpolates bilinearly, so for a fixed ``B`` ``g`` is piecewise linear in
the context with its breaks at the profile's context grid points (flat below the first,
the last segment's slope above the last). Over one linear piece the steps form an
arithmetic series, so the sum of ``m`` steps costs a few operations per piece the run
crosses instead of ``m`` lookups: that is what lets a 1,000-replica hour run in minutes.

:meth:`DecodeSteps.steps_within` inverts it (how many whole steps fit a time budget) by
bisection on the closed form. :meth:`DecodeSteps.step_times` lists every step's end, for
runs whose per-token times are recorded.
"""

from __future__ import annotations

import math

from capacity.cost_model import CostModel

_INF = math.inf


class DecodeSteps:
    """Closed-form sums of decode steps for one cost model (pieces cached per batch)."""

    __slots__ = ("_cost", "_pieces", "_ys")

    def __init__(self, cost: CostModel) -> None:
        self._cost = cost
        self._ys = cost.profile.decode.ys
        self._pieces: dict[int, list[tuple[float, float, float, float]]] = {}

    def pieces(self, batch: int) -> list[tuple[float, float, float, float]]:
        """``(lo, hi, a, b)``: on contexts in [lo, hi) a step costs ``a + b * context``."""
        cached = self._pieces.get(batch)
        if cached is not None:
            return cached
        ys, f = self._ys, self._cost.decode_step_s
        vs = [f(batch, y) for y in ys]
        out = [(-_INF, float(ys[0]), vs[0], 0.0)]
        for j in range(len(ys) - 1):
            slope = (vs[j + 1] - vs[j]) / (ys[j + 1] - ys[j])
            hi = float(ys[j + 1]) if j + 2 < len(ys) else _INF
            out.append((float(ys[j]), hi, vs[j] - slope * ys[j], slope))
        if len(ys) == 1:
            out.append((float(ys[0]), _INF, vs[0], 0.0))
        self._pieces[batch] = out
        return out

    def step_s(self, batch: int, context: int) -> float:
        """One step (the cost model's own lookup)."""
        return self._cost.decode_step_s(batch, context)

    def sum_s(self, batch: int, context: int, m: int) -> float:
        """Seconds of ``m`` steps of ``batch`` sequences starting at total ``context``."""
        if m <= 0 or batch <= 0:
            return 0.0
        last = context + (m - 1) * batch
        total = 0.0
        for lo, hi, a, b in self.pieces(batch):
            if hi <= context or lo > last:
                continue
            # steps i in [i0, i1) have lo <= context + i*batch < hi
            i0 = 0 if lo <= context else math.ceil((lo - context) / batch)
            i1 = m if hi == _INF or hi > last else math.ceil((hi - context) / batch)
            n = i1 - i0
            if n <= 0:
                continue
            first = context + i0 * batch
            total += n * a + b * (n * first + batch * n * (n - 1) / 2)
        return total if total > 0.0 else 0.0

    def steps_within(self, batch: int, context: int, m: int, budget_s: float) -> int:
        """The most whole steps (<= m) whose sum is <= ``budget_s``."""
        if budget_s <= 0.0:
            return 0
        if self.sum_s(batch, context, m) <= budget_s:
            return m
        lo, hi = 0, m  # sum(lo) <= budget < sum(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.sum_s(batch, context, mid) <= budget_s:
                lo = mid
            else:
                hi = mid
        return lo

    def step_times(self, batch: int, context: int, m: int, t0: float) -> list[float]:
        """End time of each of ``m`` steps starting at ``t0`` (lookups, step by step)."""
        f = self._cost.decode_step_s
        times, t = [], t0
        for i in range(m):
            t += f(batch, context + i * batch)
            times.append(t)
        return times
