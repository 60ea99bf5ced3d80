"""The request the simulator consumes: what a workload or a trace file becomes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request to simulate: when it arrives, its sizes and its prompt's block hashes."""

    request_id: str
    arrival_s: float  # seconds from the start of the run
    prompt_tokens: int
    output_tokens: int
    block_hashes: tuple[int, ...] = ()  # the prompt's full-block hash chain (common.hashing)
    priority: int = 0
    client_id: str = ""
    group: str = ""  # the workload's request class (results split latencies by it)
    # Multi-turn chats: turn k of ``session_id`` is sent when turn k - 1 has ended (its
    # ``arrival_s`` is then a lower bound). "" = a session of its own.
    session_id: str = ""
    turn: int = 0

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("request_id must be non-empty")
        if self.arrival_s < 0:
            raise ValueError(f"{self.request_id}: arrival_s must be >= 0, got {self.arrival_s}")
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(f"{self.request_id}: prompt_tokens and output_tokens must be >= 1")
