"""``simulate()``: build the cluster for a config, replay the requests, collect the result."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

from capacity.profile import Profile
from capacity.sim.autoscale import Autoscaler
from capacity.sim.cluster import Cluster
from capacity.sim.config import PoolSpec, SimConfig
from capacity.sim.options import SimOptions
from capacity.sim.request import SimRequest
from capacity.sim.result import SimResult, oracle_hits


def simulate(
    config: SimConfig,
    profile: Profile,
    requests: Sequence[SimRequest],
    *,
    seed: int = 0,
    options: SimOptions | None = None,
) -> SimResult:
    """Simulate ``requests`` (any order; replayed by arrival) on ``config``."""
    options = options or SimOptions()
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    if options.block_stride > 1:
        config, ordered = coarsen(config, ordered, options.block_stride)
    log_steps = options.log_steps
    if log_steps is None:
        log_steps = sum(r.output_tokens for r in ordered) <= options.full_tokens_limit
    started = time.perf_counter()
    cluster = Cluster(config, profile, options, seed, log_steps)
    for spec in config.pools:
        for _ in range(spec.replicas):
            cluster.add_replica(spec.role)
    autoscaler = Autoscaler(cluster)
    autoscaler.start()
    cluster.submit(list(ordered))
    cluster.loop.run(options.until_s)
    end = max((r.end_s for r in cluster.records), default=0.0)
    for record in cluster.records:
        if not record.end_s and not record.refused:
            record.error, record.end_s = "CANCELLED", cluster.loop.now
    cut = options.until_s != float("inf") or cluster.loop.stopped
    end = max(end, cluster.loop.now if cut else end)
    autoscaler.account(end)
    first = ordered[0].arrival_s if ordered else 0.0
    block_size = _block_size(config)
    return SimResult(
        records=cluster.records,
        unsent=cluster.unsent,
        stopped_s=cluster.loop.now if cluster.loop.stopped else None,
        replica_timeline=cluster.timeline,
        events=cluster.loop.events,
        wall_s=time.perf_counter() - started,
        duration_s=max(end - first, 0.0),
        utilisation=cluster.use,
        itl=cluster.itl,
        profile=f"{profile.hardware} / {profile.model} / {profile.dtype}",
        hit_oracle=oracle_hits(
            [r.block_hashes for r in ordered], [r.prompt_tokens for r in ordered], block_size
        ),
    )


def coarsen(
    config: SimConfig, requests: list[SimRequest], stride: int
) -> tuple[SimConfig, list[SimRequest]]:
    """Blocks of ``stride`` engine blocks: every pool's block size × stride (KV blocks ÷
    stride) and each chain's every stride-th hash (a chain prefix of k coarse blocks is
    the prefix of k × stride engine blocks, so equal coarse hashes still mean equal
    prefixes)."""

    def pool(spec: PoolSpec | None) -> PoolSpec | None:
        if spec is None:
            return None
        engine = spec.engine
        blocks = engine.num_kv_blocks
        coarse = replace(
            engine,
            block_size=engine.block_size * stride,
            num_kv_blocks=None if blocks is None else max(1, blocks // stride),
            max_num_batched_tokens=max(engine.max_num_batched_tokens, engine.block_size * stride),
        )
        return replace(spec, engine=coarse)

    config = replace(
        config,
        prefill=pool(config.prefill),
        decode=pool(config.decode),
        colocated=pool(config.colocated),
    )
    start = stride - 1
    return config, [replace(r, block_hashes=r.block_hashes[start::stride]) for r in requests]


def _block_size(config: SimConfig) -> int:
    for spec in config.pools:
        return spec.engine.block_size
    return 16


__all__ = ["SimOptions", "simulate"]
