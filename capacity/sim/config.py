"""What the simulator simulates: the cluster's shape, read from a Serve YAML.

:func:`sim_config_from_serve` takes ``deploy/serve.yaml`` (a path or a loaded
:class:`~deploy.serve_config.ServeConfig`) and keeps what changes latency: the router pool
(policy, admission limits, conditional disaggregation), each worker deployment's engine
options (block size, KV blocks, token budget, batch cap), its admission limits and its
replica counts / autoscaling config. Everything is validated by the same code the real
deployment runs (``ServeConfig.check``, ``AppArgs``, ``WorkerConfig``), so a YAML the
simulator accepts is one ``pdserve up`` accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.worker_info import WorkerRole
from deploy.app_config import DEPLOYMENT_OF_ROLE
from deploy.serve_config import ServeConfig
from router.config import PoolConfig

_CHECK_URL = "redis://simulated"


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """The engine options that shape a replica's steps (engine/config.py)."""

    block_size: int = 16
    num_kv_blocks: int | None = None  # None: the profile's
    max_num_batched_tokens: int = 1024
    max_num_seqs: int = 64
    enable_prefix_caching: bool = True
    long_prefill_token_threshold: int = 512  # 0: strict FIFO chunking


@dataclass(frozen=True, slots=True)
class AutoscaleSpec:
    """A deployment's ``autoscaling_config`` (Serve's keys) and its policy."""

    min_replicas: int
    max_replicas: int
    initial_replicas: int
    policy_function: str  # "deploy.autoscaling:prefill_policy" / ":decode_policy"
    policy_kwargs: dict[str, Any] = field(default_factory=dict)
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    upscaling_factor: float = 1.0
    downscaling_factor: float = 1.0


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """One worker deployment: its role, replicas and per-replica options."""

    role: WorkerRole
    replicas: int  # fixed count, or the initial count when autoscaled
    engine: EngineSpec = field(default_factory=EngineSpec)
    max_active_requests: int | None = None  # None: engine.max_num_seqs
    admission_queue_size: int = 256
    layer_wise: bool = True
    autoscale: AutoscaleSpec | None = None

    def __post_init__(self) -> None:
        if self.replicas < 0:
            raise ValueError(f"{self.role.value}: replicas must be >= 0")

    @property
    def active_slots(self) -> int:
        return self.max_active_requests or self.engine.max_num_seqs


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The simulated cluster: one router pool over prefill+decode or colocated workers."""

    pool: PoolConfig = field(default_factory=lambda: PoolConfig("default"))
    prefill: PoolSpec | None = None
    decode: PoolSpec | None = None
    colocated: PoolSpec | None = None
    latency_window_s: float = 10.0  # the p90s the autoscaling policies see
    refresh_interval_s: float = 0.1  # router snapshot refresh
    prediction_ttl_s: float = 10.0
    heartbeat_interval_s: float = 0.25  # load reports
    default_deadline_s: float | None = 300.0

    def __post_init__(self) -> None:
        if (self.prefill is None) != (self.decode is None):
            raise ValueError("prefill and decode pools come together")
        if self.prefill is None and self.colocated is None:
            raise ValueError("a SimConfig needs prefill+decode or colocated workers")

    @property
    def pools(self) -> tuple[PoolSpec, ...]:
        return tuple(p for p in (self.prefill, self.decode, self.colocated) if p is not None)

    @property
    def disaggregated(self) -> bool:
        return self.prefill is not None


def sim_config_from_serve(source: str | Path | ServeConfig, pool: str | None = None) -> SimConfig:
    """The :class:`SimConfig` of a Serve YAML (validated as ``pdserve up`` would)."""
    serve = source if isinstance(source, ServeConfig) else ServeConfig.load(source)
    args = serve.args
    router = args.router_config(redis_url=_CHECK_URL)
    name = pool or router.default_pool or router.pools[0].name
    pool_config = next((p for p in router.pools if p.name == name), None)
    if pool_config is None:
        raise ValueError(f"no router pool {name!r} in {[p.name for p in router.pools]}")
    specs: dict[WorkerRole, PoolSpec] = {}
    heartbeat = 0.25
    for role in args.workers:
        section = serve.worker_section(role)
        worker = args.worker_config(role, section, worker_id="sim", redis_url=_CHECK_URL)
        heartbeat = worker.heartbeat_interval_s
        specs[role] = _pool_spec(role, worker, serve.deployment(DEPLOYMENT_OF_ROLE[role]))
    return SimConfig(
        pool=pool_config,
        prefill=specs.get(WorkerRole.PREFILL),
        decode=specs.get(WorkerRole.DECODE),
        colocated=specs.get(WorkerRole.COLOCATED),
        latency_window_s=args.latency_window_s,
        refresh_interval_s=router.refresh_interval_s,
        prediction_ttl_s=router.prediction_ttl_s,
        heartbeat_interval_s=heartbeat,
        default_deadline_s=router.default_deadline_s,
    )


def _pool_spec(role: WorkerRole, worker: Any, deployment: dict[str, Any]) -> PoolSpec:
    engine = worker.engine
    spec = EngineSpec(
        block_size=engine.block_size,
        num_kv_blocks=engine.num_kv_blocks,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        max_num_seqs=engine.max_num_seqs,
        enable_prefix_caching=engine.enable_prefix_caching,
        long_prefill_token_threshold=engine.long_prefill_token_threshold,
    )
    scaling = deployment.get("autoscaling_config")
    autoscale = _autoscale(scaling) if scaling else None
    replicas = autoscale.initial_replicas if autoscale else int(deployment.get("num_replicas", 1))
    return PoolSpec(
        role=role,
        replicas=replicas,
        engine=spec,
        max_active_requests=worker.max_active_requests,
        admission_queue_size=worker.admission_queue_size,
        layer_wise=worker.layer_wise,
        autoscale=autoscale,
    )


def _autoscale(scaling: dict[str, Any]) -> AutoscaleSpec:
    """Serve's defaults (ray.serve.config.AutoscalingConfig) where the YAML is silent."""
    policy = scaling.get("policy") or {}
    low = int(scaling.get("min_replicas", 1))
    initial = scaling.get("initial_replicas")
    return AutoscaleSpec(
        min_replicas=low,
        max_replicas=int(scaling.get("max_replicas", 1)),
        initial_replicas=int(initial) if initial is not None else max(low, 1),
        policy_function=str(policy.get("policy_function", "")),
        policy_kwargs=dict(policy.get("policy_kwargs") or {}),
        metrics_interval_s=float(scaling.get("metrics_interval_s", 10.0)),
        look_back_period_s=float(scaling.get("look_back_period_s", 30.0)),
        upscale_delay_s=float(scaling.get("upscale_delay_s", 30.0)),
        downscale_delay_s=float(scaling.get("downscale_delay_s", 600.0)),
        upscaling_factor=float(scaling.get("upscaling_factor") or 1.0),
        downscaling_factor=float(scaling.get("downscaling_factor") or 1.0),
    )
