"""Shared builders for the simulator's unit tests: a small synthetic profile and configs."""

from __future__ import annotations

from dataclasses import replace

from capacity.profile import Grid2D, Profile, TransferFit
from capacity.sim.config import AutoscaleSpec, EngineSpec, PoolSpec, SimConfig
from common.worker_info import WorkerRole
from router.config import PoolConfig


def profile(**overrides: object) -> Profile:
    base = Profile(
        hardware="synthetic test hardware",
        model="test-model",
        dtype="float32",
        engine={"block_size": 16},
        kv_bytes_per_token=46080,
        num_kv_blocks=1024,
        block_size=16,
        prefill=Grid2D(
            "new_tokens",
            "cached_tokens",
            (1, 64, 512, 2048),
            (0, 1024, 4096),
            ((0.01, 0.012, 0.02), (0.03, 0.035, 0.05), (0.2, 0.25, 0.3), (0.8, 0.9, 1.0)),
        ),
        decode=Grid2D(
            "batch_size",
            "total_context",
            (1, 8, 64),
            (0, 512, 4096, 65536),
            ((0.02, 0.022, 0.03, 0.1), (0.025, 0.03, 0.05, 0.2), (0.04, 0.06, 0.12, 0.5)),
        ),
        transfer=TransferFit(0.001, 2.5e9),
        router_decision_s=0.0002,
        overheads={"rpc_s": 0.0005},
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def pool_spec(role: WorkerRole, replicas: int = 1, **engine: int) -> PoolSpec:
    return PoolSpec(role=role, replicas=replicas, engine=EngineSpec(**engine))  # type: ignore[arg-type]


def disagg(
    prefill: int = 1,
    decode: int = 1,
    policy: str = "prefix_aware",
    conditional: dict | None = None,
    **engine: int,
) -> SimConfig:
    return SimConfig(
        pool=PoolConfig("default", policy=policy, conditional=conditional),  # type: ignore[arg-type]
        prefill=pool_spec(WorkerRole.PREFILL, prefill, **engine),
        decode=pool_spec(WorkerRole.DECODE, decode, **engine),
    )


def colocated(replicas: int = 2, **engine: int) -> SimConfig:
    return SimConfig(colocated=pool_spec(WorkerRole.COLOCATED, replicas, **engine))


def autoscaled(spec: PoolSpec, low: int, high: int, policy: str, **kwargs: object) -> PoolSpec:
    auto = AutoscaleSpec(
        min_replicas=low,
        max_replicas=high,
        initial_replicas=spec.replicas,
        policy_function=policy,
        policy_kwargs=dict(kwargs),
        metrics_interval_s=1.0,
        look_back_period_s=5.0,
        upscale_delay_s=5.0,
        downscale_delay_s=10.0,
    )
    return replace(spec, autoscale=auto)
