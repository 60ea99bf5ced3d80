"""How to simulate (not what): fidelity and speed knobs of :func:`capacity.sim.simulate`."""

from __future__ import annotations

from dataclasses import dataclass

from loadgen.summary import Slo


@dataclass(frozen=True, slots=True)
class SimOptions:
    """How to simulate (not what): fidelity and speed knobs."""

    # Per-request token times in the records (exact ITLs). None: on when the run has at
    # most ``full_tokens_limit`` output tokens; off, ITL percentiles come from a histogram
    # and each record keeps its first and last token only.
    log_steps: bool | None = None
    full_tokens_limit: int = 2_000_000
    per_step: bool = False  # reference mode: one event per decode step (tests, checks)
    # Router snapshot refresh; None: the config's refresh, at least its heartbeat interval.
    refresh_interval_s: float | None = None
    index_events: bool | None = None  # feed the prefix index; None: when routing needs it
    # Coarse KV blocks: simulate blocks of ``block_stride`` engine blocks (prefix hits and
    # block use rounded to that many blocks). 1 = exact; big fleets use 4-8, because each
    # block costs a few Python operations in the block pool and the prefix index.
    block_stride: int = 1
    # Feed the ITL histogram (when token times are not logged). False: the summary's ITL
    # figures stay empty, for callers that read only records' TTFT / TPOT / end (the
    # planner): each decode run then costs no extra step lookups.
    itl_histogram: bool = True
    replica_startup_s: float = 5.0  # a scaled-up replica serves this long after the decision
    until_s: float = float("inf")  # stop the clock here (requests in flight: CANCELLED)
    # Closed loop (bench run --concurrency): this many clients, each sending its next
    # session when its last one ended; arrivals are ignored. None: open loop (arrival_s).
    concurrency: int | None = None
    max_start_s: float = float("inf")  # no session starts later (bench run --max-duration)
    # Stop early: once more than ``miss_limit`` requests have certainly missed ``miss_slo``
    # (refused or failed; a TTFT over its bound at the first token; a finished request
    # that misses it), stop the clock (requests in flight: CANCELLED, so every summary
    # figure is then a partial one). None: run to the end. The caller picks the limit
    # (the planner: the most misses its attainment allows, capacity/plan_eval.py).
    miss_slo: Slo | None = None
    miss_limit: int = 0
