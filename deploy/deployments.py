"""The Serve deployments: Router, PrefillWorker, DecodeWorker and the colocated Worker.

Each class is a thin shell around a host (:class:`~deploy.worker_host.WorkerHost`,
:class:`~deploy.router_host.RouterHost`) that Serve constructs, health-checks, scales,
reconfigures and stops. No request goes through Serve: the router serves the public gRPC
port itself and reaches workers over their own gRPC servers, found in the Redis
registry. Serve's part is the replicas' lifecycle::

    __init__                  read the app's args (shared: Redis, namespace, router)
    reconfigure(user_config)  worker replicas: the first call starts the worker from the
                              deployment's user_config and returns once it is registered
                              and SERVING; a *changed* user_config (a redeploy) starts a
                              worker with the new config, then drains the old one, which
                              finishes its streams while new work goes to its successor
    check_health              the host's own gRPC health (every health_check_period_s)
    record_autoscaling_stats  worker replicas: the metrics the pool's policy reads
    __del__                   Serve's graceful shutdown (scale-down, heavyweight redeploy,
                              delete): drain — stop taking work, finish streams — then
                              exit. graceful_shutdown_timeout_s must exceed drain_grace_s.

The decorators' options are defaults for the local 2-CPU cluster; serve.yaml overrides
them per deployment (placement, autoscaling, health checks, user_config).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import ray
from ray import serve

from common import env
from common.worker_info import WorkerRole
from deploy.app_config import ROUTER_SHUTDOWN_TIMEOUT_S, WORKER_SHUTDOWN_TIMEOUT_S, AppArgs
from deploy.replica_stats import StatsPublisher
from deploy.router_host import RouterHost
from deploy.worker_host import WorkerHost

log = logging.getLogger(__name__)

_WORKER_OPTIONS: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 1},
    "user_config": {},  # so that reconfigure (which starts the worker) is always called
    "health_check_period_s": 5,
    "health_check_timeout_s": 30,
    "graceful_shutdown_timeout_s": WORKER_SHUTDOWN_TIMEOUT_S,
}


class _WorkerReplica:
    role: ClassVar[WorkerRole]

    def __init__(self, args: dict[str, Any]) -> None:
        env.apply_offline_defaults()
        self._args = AppArgs.parse(args)
        context = serve.get_replica_context()
        self.deployment = context.deployment
        self.replica_id = context.replica_id.unique_id
        self._redis_url = self._args.redis_url or env.redis_url()
        self._node_ip = ray.util.get_node_ip_address()
        self._host: WorkerHost | None = None
        self._section: dict[str, Any] | None = None
        self._generation = 0
        self._publisher: StatsPublisher | None = None

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        section = dict(user_config or {})
        if self._host is not None and section == self._section:
            return
        suffix = f"-{self._generation}" if self._generation else ""
        config = self._args.worker_config(
            self.role,
            section,
            worker_id=f"{self.role.value}-{self.replica_id}{suffix}",
            redis_url=self._redis_url,
            node_ip=self._node_ip,
        )
        host = WorkerHost(config, self._args.latency_window_s)
        host.start()
        try:
            await host.wait_ready()
        except BaseException:  # the old worker, if any, keeps serving
            await host.stop()
            raise
        old, self._host, self._section = self._host, host, section
        self._generation += 1
        await self._publish(host)
        if old is not None:
            log.info("%s replaces %s: draining the old worker", host.worker_id, old.worker_id)
            await old.stop()

    async def check_health(self) -> None:
        if self._host is None:
            raise RuntimeError("no worker: reconfigure() has not run")
        await self._host.check_health()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self._host.autoscaling_stats() if self._host is not None else {}

    async def worker(self) -> dict[str, Any]:
        """Who this replica is: worker id, role, pool, addresses (for tools and tests)."""
        host = self._host
        info = host.info if host is not None else None
        return {
            "worker_id": host.worker_id if host is not None else None,
            "replica_id": self.replica_id,
            "role": self.role.value,
            "pool": host.config.pool if host is not None else None,
            "grpc_address": info.grpc_address if info else None,
            "kv_address": info.kv_address if info else None,
        }

    async def __del__(self) -> None:
        if self._publisher is not None:
            await self._publisher.stop()
        if self._host is not None:
            log.info("%s: draining before exit", self._host.worker_id)
            await self._host.stop()

    async def _publish(self, host: WorkerHost) -> None:
        if self._publisher is not None:
            await self._publisher.stop()
        config = host.config
        assert config.redis_url is not None
        self._publisher = StatsPublisher(
            config.redis_url,
            config.namespace,
            config.worker_id,
            lambda: host.replica_stats(self.deployment, self.replica_id),
            password_file=config.redis_password_file,
        )
        self._publisher.start()


@serve.deployment(name="PrefillWorker", **_WORKER_OPTIONS)
class PrefillWorker(_WorkerReplica):
    role = WorkerRole.PREFILL


@serve.deployment(name="DecodeWorker", **_WORKER_OPTIONS)
class DecodeWorker(_WorkerReplica):
    role = WorkerRole.DECODE


@serve.deployment(name="Worker", **_WORKER_OPTIONS)
class Worker(_WorkerReplica):
    role = WorkerRole.COLOCATED


@serve.deployment(
    name="Router",
    num_replicas=1,
    max_replicas_per_node=1,  # it binds the node's public port
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=5,
    graceful_shutdown_timeout_s=ROUTER_SHUTDOWN_TIMEOUT_S,
)
class Router:
    """The app's ingress. Bound with the worker deployments so they belong to the app."""

    async def __init__(self, args: dict[str, Any], *workers: Any) -> None:
        env.apply_offline_defaults()
        spec = AppArgs.parse(args)
        config = spec.router_config(
            redis_url=spec.redis_url or env.redis_url(), node_ip=ray.util.get_node_ip_address()
        )
        self._host = RouterHost(config, spec.router_drain_grace_s)
        self._host.start()
        try:
            await self._host.wait_ready()
        except BaseException:
            await self._host.stop()
            raise

    async def address(self) -> str:
        """The gRPC endpoint this replica serves (``host:port``)."""
        assert self._host.address is not None
        return self._host.address

    async def http_address(self) -> str | None:
        """The OpenAI-compatible HTTP endpoint (``host:port``); None without HTTP."""
        return self._host.http_address

    async def check_health(self) -> None:
        await self._host.check_health()

    async def __del__(self) -> None:
        await self._host.stop()
