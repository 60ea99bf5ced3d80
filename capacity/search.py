"""Search strategies of the planner: pure functions over a monotone feasibility check.

The planner's question for a layout is "the fewest replicas that meet the SLO". Meeting
the SLO is monotone in each pool's size (one more replica never makes attainment worse,
up to simulation noise), which gives:

- :func:`min_true`: the smallest integer in [low, high] where a monotone predicate holds,
  by exponential probing from ``low`` then bisection: O(log n) simulations, and the probes
  stay near small (cheap to simulate) counts.
- :func:`min_true_near`: the same threshold, starting from a guess (an analytic estimate):
  probe outward from the guess in doubling (or unit) steps until the predicate flips,
  then bisect; :func:`bracket` is the same search as a coroutine.
  A guess within k of the answer costs O(log k) simulations instead of O(log n).
- :func:`minimize`: the minimum of an integer function over [low, high], coarse to fine:
  evaluate a grid of ``points`` (in one batch, so a process pool can run it in parallel),
  then shrink the interval around the best point and repeat until the step is 1. For
  ``prefill + min_decode(prefill)`` this finds the best prefill:decode split without
  simulating every ratio.

Everything here is deterministic and simulator-free (unit-tested with plain functions).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence

Batch = Callable[[Sequence[int]], Sequence[float | None]]  # None: infeasible point


def min_true(pred: Callable[[int], bool], low: int, high: int) -> int | None:
    """The smallest ``n`` in [low, high] with ``pred(n)``, assuming monotone; None if none."""
    if low > high:
        return None
    probe, last_false = low, low - 1
    while not pred(probe):  # exponential probing: low, low+1, low+3, low+7, ...
        last_false = probe
        if probe >= high:
            return None
        probe = min(high, low + 2 * (probe - low) + 1)
    lo, hi = last_false + 1, probe  # pred(hi) holds; everything below lo fails
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def min_true_near(
    pred: Callable[[int], bool], guess: int, low: int, high: int, grow: int = 2
) -> int | None:
    """:func:`min_true` bracketed from ``guess`` (clamped to [low, high]) outward."""
    steps = bracket(guess, low, high, grow)
    try:
        probe = next(steps)
        while True:
            probe = steps.send(pred(probe))
    except StopIteration as done:
        return done.value


def bracket(guess: int, low: int, high: int, grow: int = 2) -> Generator[int, bool, int | None]:
    """:func:`min_true_near` as a coroutine: yields each probe, is sent whether the
    predicate holds there, and returns the threshold (None if none). Two of them driven
    in lock-step search two pools with one simulation per step (capacity/plan.py).
    The outward steps grow ``grow``-fold (2: doubling; 1: a linear walk, for a guess
    known to be within a step or two)."""
    if low > high:
        return None
    probe = max(low, min(high, guess))
    step = 1
    if (yield probe):  # walk down until it fails (or low holds)
        hi = probe
        while hi > low:
            probe = max(low, hi - step)
            if not (yield probe):
                break
            hi, step = probe, step * grow
        else:
            return low
        lo = probe + 1
    else:  # walk up until it holds (or high fails)
        lo = probe + 1
        while True:
            if lo > high:
                return None
            probe = min(high, lo + step - 1)
            if (yield probe):
                break
            lo, step = probe + 1, step * grow
        hi = probe
    while lo < hi:
        mid = (lo + hi) // 2
        if (yield mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def grid(low: int, high: int, points: int) -> list[int]:
    """Up to ``points`` integers spread evenly over [low, high], both ends included."""
    if high <= low or points <= 1:
        return [low] if high <= low else [low, high]
    span = high - low
    return sorted({low + round(span * i / (points - 1)) for i in range(points)})


def minimize(batch: Batch, low: int, high: int, points: int = 6) -> tuple[int, float] | None:
    """``(x, f(x))`` minimising ``f`` over [low, high], coarse to fine (see the module doc).

    ``batch(xs)`` returns ``f`` of each x (None where infeasible); values are cached, so
    each point is evaluated once. Ties go to the smaller x. The fine stage is a local
    descent over windows of ``points`` either side of the best point, repeated while it
    improves, so a plateau (``p + ceil(k / p)`` has many) does not stop it early.
    """
    points = max(points, 4)  # fewer and the interval would not shrink
    seen: dict[int, float | None] = {}

    def run(xs: Sequence[int]) -> tuple[float, int] | None:
        todo = [x for x in xs if x not in seen]
        seen.update(zip(todo, batch(todo), strict=True))
        feasible = [(v, x) for x, v in seen.items() if v is not None]
        return min(feasible) if feasible else None

    lo, hi = low, high
    while hi - lo + 1 > 2 * points:  # coarse: shrink around the best grid point
        found = run(grid(lo, hi, points))
        if found is None:
            return None
        step = max(1, (hi - lo) // (points - 1))
        lo, hi = max(low, found[1] - step), min(high, found[1] + step)
    found = run(range(lo, hi + 1))
    while found is not None:  # fine: local descent until no window improves
        better = run(range(max(low, found[1] - points), min(high, found[1] + points) + 1))
        if better == found:
            return found[1], found[0]
        found = better
    return None
