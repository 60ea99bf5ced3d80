"""``pdserve status``: the app's deployments and every worker's load, as tables.

Two sources, joined by worker id (``<role>-<Serve replica id>``):

- Serve (through Ray): deployments, their status, target and running replica counts,
  and the replicas themselves — what the autoscaler has decided and done;
- Redis: the registry's load report of each worker (queue, batch, KV blocks, draining)
  and the replica stats the worker replicas publish (TTFT / ITL / admission-queue
  p90 of the recent window, prefix hit rate) — what the workers are doing.

:func:`collect` does the I/O, :func:`render` is pure (tested on hand-built reports).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from common import env
from common.cluster_secret import ClusterSecret, load_secret
from common.redis_client import open_sync, redact_url
from common.registry import SyncRegistryReader
from common.worker_info import WorkerInfo, WorkerLoad
from deploy.app_config import DEPLOYMENT_OF_ROLE, AppArgs
from deploy.replica_stats import ReplicaStats, read_all

_ROLE_OF_DEPLOYMENT = {name: role.value for role, name in DEPLOYMENT_OF_ROLE.items()}


@dataclass(frozen=True, slots=True)
class DeploymentRow:
    name: str
    status: str
    target: int
    running: int
    replica_states: dict[str, int]
    autoscaling: str  # "1..4" or "" for a fixed count
    replica_ids: tuple[str, ...]  # of the RUNNING replicas


@dataclass(frozen=True, slots=True)
class WorkerRow:
    info: WorkerInfo
    load: WorkerLoad | None
    stats: ReplicaStats | None
    replica_id: str  # "" when no Serve replica hosts it (a standalone worker)


@dataclass
class StatusReport:
    app: str
    app_status: str
    ray_address: str
    redis_url: str | None
    deployments: list[DeploymentRow] = field(default_factory=list)
    workers: list[WorkerRow] = field(default_factory=list)


def run(
    address: str | None = None,
    redis_url: str | None = None,
    app: str | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    redis_password_file: str | None = None,
) -> int:
    try:
        report = collect(address, redis_url, app, redis_password_file)
    except Exception as exc:
        print(f"pdserve status: {exc}", file=err)
        return 1
    out.write(render(report))
    return 0 if report.app_status == "RUNNING" else 2


def collect(
    address: str | None,
    redis_url: str | None,
    app: str | None,
    redis_password_file: str | None = None,
) -> StatusReport:
    from deploy.up import read_state

    state = read_state() or {}
    address = address or state.get("ray_address") or "auto"
    details = _serve_details(address)
    apps = details.get("applications") or {}
    app = app or ("pdserve" if "pdserve" in apps else next(iter(apps), None))
    if app is None or app not in apps:
        raise RuntimeError(f"no Serve application {app or ''} on the cluster at {address}")
    app_details = apps[app]
    args = AppArgs.parse((app_details.get("deployed_app_config") or {}).get("args"))
    redis_url = redis_url or args.redis_url or state.get("redis_url") or env.redis_url()
    report = StatusReport(app, _name(app_details.get("status")), address, redis_url)
    report.deployments = [
        _deployment_row(name, d) for name, d in (app_details.get("deployments") or {}).items()
    ]
    if redis_url is not None:
        password_file = redis_password_file or args.redis_password_file
        secret = _readable_secret(args.cluster_secret_file)
        report.workers = _workers(
            redis_url, args.namespace, report.deployments, password_file, secret
        )
    return report


def render(report: StatusReport) -> str:
    lines = [
        f"app {report.app}: {report.app_status}   ray {report.ray_address}   "
        f"redis {redact_url(report.redis_url)}",
        "",
    ]
    lines += _table(
        ["DEPLOYMENT", "STATUS", "REPLICAS", "TARGET", "AUTOSCALING", "STATES"],
        [
            [
                d.name,
                d.status,
                str(d.running),
                str(d.target),
                d.autoscaling or "fixed",
                " ".join(f"{k}={v}" for k, v in sorted(d.replica_states.items())),
            ]
            for d in report.deployments
        ],
    )
    lines.append("")
    if report.redis_url is None:
        lines.append("(no redis_url: worker load unavailable; pass --redis-url)")
    elif not report.workers:
        lines.append("(no workers registered)")
    else:
        lines += _table(
            ["POOL", "ROLE", "WORKER", "REPLICA", "QUEUED", "RUNNING", "KV USE",
             "PREFIX HIT", "TTFT p90", "ITL p90", "QUEUE p90", "STATE"],
            [_worker_cells(w) for w in report.workers],
        )  # fmt: skip
    return "\n".join(lines) + "\n"


# ---- collection ------------------------------------------------------------------------------


def _serve_details(address: str) -> dict[str, Any]:
    from deploy.local_ray import connect

    connect(address)
    import ray
    from ray.serve.context import _get_global_client

    try:
        return dict(_get_global_client().get_serve_details())
    finally:
        ray.shutdown()


def _deployment_row(name: str, d: dict[str, Any]) -> DeploymentRow:
    replicas = d.get("replicas") or []
    states: dict[str, int] = {}
    for r in replicas:
        states[_name(r.get("state"))] = states.get(_name(r.get("state")), 0) + 1
    running = tuple(str(r["replica_id"]) for r in replicas if _name(r.get("state")) == "RUNNING")
    scaling = (d.get("deployment_config") or {}).get("autoscaling_config") or {}
    bounds = f"{scaling['min_replicas']}..{scaling['max_replicas']}" if scaling else ""
    return DeploymentRow(
        name=name,
        status=_name(d.get("status")),
        target=int(d.get("target_num_replicas") or 0),
        running=len(running),
        replica_states=states,
        autoscaling=bounds,
        replica_ids=running,
    )


def _workers(
    redis_url: str,
    namespace: str,
    deployments: Sequence[DeploymentRow],
    password_file: str | None = None,
    secret: ClusterSecret | None = None,
) -> list[WorkerRow]:
    reader = SyncRegistryReader(redis_url, namespace, password_file=password_file, secret=secret)
    client = open_sync(redis_url, password_file=password_file, decode_responses=True)
    try:
        infos, loads, stats = reader.list_workers(), reader.loads(), read_all(client, namespace)
    finally:
        reader.close()
        client.close()
    replicas = {
        f"{_ROLE_OF_DEPLOYMENT[d.name]}-{rid}": rid
        for d in deployments
        if d.name in _ROLE_OF_DEPLOYMENT
        for rid in d.replica_ids
    }
    rows = [
        WorkerRow(i, loads.get(i.worker_id), stats.get(i.worker_id), replicas.get(i.worker_id, ""))
        for i in infos
    ]
    order = {"prefill": 0, "decode": 1, "colocated": 2}
    return sorted(
        rows, key=lambda w: (w.info.pool, order.get(w.info.role.value, 9), w.info.worker_id)
    )


def _readable_secret(path: str | None) -> ClusterSecret | None:
    """The cluster secret when this machine can read it: status then lists only the
    workers that signed their registration, as the router routes to."""
    try:
        return load_secret(path)
    except ValueError:
        return None


def _name(value: Any) -> str:
    """Serve's status enums by their plain value ("RUNNING", not "ReplicaState.RUNNING")."""
    return str(getattr(value, "value", value))


# ---- rendering -------------------------------------------------------------------------------


def _worker_cells(w: WorkerRow) -> list[str]:
    load, stats = w.load, w.stats
    kv = stats.kv_block_use if stats is not None else None
    if kv is None and load is not None and load.free_blocks + load.used_blocks:
        kv = load.used_blocks / (load.free_blocks + load.used_blocks)
    ttft = stats.ttft_p90_ms if stats is not None else None
    itl = stats.itl_p90_ms if stats is not None else None
    return [
        w.info.pool,
        w.info.role.value,
        w.info.worker_id,
        w.replica_id or "-",
        str(load.queued) if load else "?",
        str(load.running) if load else "?",
        _pct(kv),
        _pct(stats.prefix_hit_rate if stats else None),
        _ms(ttft),
        _ms(itl),
        _ms(stats.queue_time_p90_ms if stats is not None else None),
        ("draining" if load.draining else "serving") if load else "?",
    ]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]  # fmt: skip
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers).rstrip(), *(fmt.format(*r).rstrip() for r in rows)]
