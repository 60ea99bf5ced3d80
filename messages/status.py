"""``WorkerControl.GetStatus``: what any caller (an operator, a test, a benchmark) asks a
worker about its load, answered exactly as of the end of the current engine step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """One worker's identity and load, as ``GetStatus`` answers."""

    worker_id: str  # as registered
    role: str  # prefill | decode | colocated
    pool: str  # the routing pool it serves
    waiting: int  # queued in the worker or the engine, or waiting for KV blocks
    running: int  # in the engine's running batch
    free_blocks: int  # allocatable now
    used_blocks: int  # referenced: running, reserved for a transfer, being sent
    cached_blocks: int  # in the prefix cache (reusable), referenced or not
    total_blocks: int  # the KV cache's size
    in_flight_transfers: int  # KV transfers not yet terminal
    draining: bool  # refusing new work, finishing what it has
