"""One simulated request's state as it moves through the cluster.

Lifecycle (the queues of the real router and workers, in order)::

    router admission  waits for one of the pool's in-flight slots (max_in_flight), or is
                      refused when max_queued wait already
    decision          router_decision_s later: the real router.routing.decide picks the
                      prefill worker (or none: local prefill) and the decode worker
    decode admission  one of the decode worker's active slots, or its admission queue;
                      a full queue refuses (the router then tries another decode worker)
    prealloc          waits until the decode worker can reserve the request's KV blocks
    prefill           in a prefill worker's (or, local, its own) waiting queue, computed in
                      token-budget chunks; the first token is sampled at the last chunk
    transfer          the prompt's KV to the decode worker (layer-wise: overlapped with
                      the last chunk); the first token reaches the client when it lands
    running           in the decode worker's continuous batch until its last token
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from capacity.sim.blocks import Holding
from capacity.sim.request import SimRequest
from loadgen.record import RequestRecord

if TYPE_CHECKING:
    from capacity.sim.replica import EngineReplica


class Job:
    """Mutable per-request state; the record is what the load generator would have seen."""

    __slots__ = (
        "admitted_s",
        "cached",
        "computed",
        "decode",
        "decode_blocks",
        "finish_step",
        "first_token_s",
        "join_step",
        "local",
        "missed",
        "prefill",
        "prefill_blocks",
        "queued_s",
        "record",
        "refused_by",
        "remaining",
        "req",
        "scheduled",
        "started_s",
        "tokens",
    )

    def __init__(self, req: SimRequest, record: RequestRecord) -> None:
        self.req = req
        self.record = record
        self.decode: EngineReplica | None = None
        self.prefill: EngineReplica | None = None  # None: prefilled where it decodes
        self.local = False
        self.refused_by: frozenset[str] = frozenset()
        self.remaining = req.prompt_tokens  # prompt tokens left to compute
        self.computed = 0  # prompt tokens whose KV exists on the computing replica
        self.cached = 0  # of which came from its prefix cache
        self.prefill_blocks: Holding | None = None
        self.decode_blocks: Holding | None = None
        self.queued_s = 0.0  # entered the worker's admission queue
        self.admitted_s = 0.0  # got a worker slot
        self.scheduled = False  # has its blocks on the computing replica
        self.started_s = 0.0  # first scheduled in a prefill step
        self.first_token_s = 0.0
        self.join_step = 0  # decode step index of its first decoded token
        self.finish_step = 0  # decode step index after its last token
        self.tokens = 1  # tokens sent so far
        self.missed = False  # counted as missing the stop-early SLO (SimOptions.miss_slo)

    @property
    def context_at_finish(self) -> int:
        return self.req.prompt_tokens + self.req.output_tokens

    def describe(self) -> dict[str, Any]:  # debugging aid
        return {"id": self.req.request_id, "remaining": self.remaining, "local": self.local}
