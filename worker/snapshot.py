"""What a worker app reports about its load: :class:`WorkerSnapshot`.

The runtime turns it into gauges, into the heartbeat's :class:`~common.worker_info.WorkerLoad`
and into ``GetStatus`` answers."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """A worker's load right now; cheap to take (no engine-thread round trip)."""

    waiting: int  # accepted, not running yet (worker queues + engine waiting queue)
    running: int  # in the engine's running batch
    free_blocks: int  # allocatable now: never used, or cached and unreferenced
    used_blocks: int  # referenced: running, reserved for a transfer, being sent
    cached_blocks: int  # in the prefix cache (reusable), referenced or not
    total_blocks: int
    in_flight_transfers: int
    queues: dict[str, int] = field(default_factory=dict)  # lifecycle queue → depth
    queued_prefill_tokens: int = 0
    ttft_ms_recent: float | None = None
    itl_ms_recent: float | None = None
    # Admission queue (overload control): time a request waited from acceptance until its
    # work started (p90 over the recent window; None = no samples), and the queue's bound.
    queue_time_ms_recent: float | None = None
    admission_limit: int = 0  # 0 = unbounded
    kv_peers: tuple[str, ...] = ()  # KV receivers this worker holds a pair group with
