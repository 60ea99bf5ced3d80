"""The pdserve application's configuration, split the way Serve updates it.

serve.yaml carries two kinds of pdserve settings:

``args`` (the application's, read by ``deploy.app:build_app``): what the whole app shares.
Serve hashes ``args`` into the code version of *every* deployment, so changing them
restarts the whole app. Layout (every key optional)::

    args:
      redis_url: null          # null = $PDSERVE_REDIS_URL on each node (cluster.yaml sets it)
      namespace: pdserve       # registry key namespace, shared by router and workers
      redis_password_file: null   # Redis password file, same path on every node
      cluster_secret_file: null   # cluster secret file, same path on every node (`pdserve
                               # up` generates one); the secret never enters the app config
      latency_window_s: 10     # TTFT / ITL p90 the autoscaling policies see: last N seconds
      workers: [prefill, decode]   # worker deployments: prefill + decode and/or colocated
      router_drain_grace_s: 10 # on stop, the router's in-flight streams get this long
      router:                  # router.config.RouterConfig fields (pools, policies, ...)
        host: auto             # auto = this node's Ray IP (127.0.0.1 on the local cluster)
        port: 50051

``user_config`` of each worker deployment (PrefillWorker, DecodeWorker, Worker): that
pool's :class:`~worker.config.WorkerConfig` (minus the keys the deployment sets:
role, worker_id, redis_url, namespace, the two secret files). Serve applies a changed
``user_config`` to the running replicas without touching the rest of the app; each replica
then starts a worker with the new config and drains the old one (see
:mod:`deploy.deployments`).

``host: auto`` (workers' ``host`` and ``kv_transfer.host``, the router's ``host``) binds
the node's Ray address: 127.0.0.1 locally, the node's private IP on a cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.worker_info import WorkerRole
from router.config import RouterConfig
from worker.config import WorkerConfig

AUTO_HOST = "auto"

# Deployment name of each worker role, as serve.yaml's `deployments:` names them.
DEPLOYMENT_OF_ROLE: dict[WorkerRole, str] = {
    WorkerRole.PREFILL: "PrefillWorker",
    WorkerRole.DECODE: "DecodeWorker",
    WorkerRole.COLOCATED: "Worker",
}
ROUTER_DEPLOYMENT = "Router"
# The deployments' graceful_shutdown_timeout_s unless serve.yaml sets one.
WORKER_SHUTDOWN_TIMEOUT_S = 60.0
ROUTER_SHUTDOWN_TIMEOUT_S = 30.0

# Set per replica by the deployment, never by the YAML.
_SECRET_KEYS = frozenset({"redis_password_file", "cluster_secret_file"})
_MANAGED_WORKER_KEYS = frozenset({"role", "worker_id", "redis_url", "namespace"}) | _SECRET_KEYS
_MANAGED_ROUTER_KEYS = frozenset({"redis_url", "namespace"}) | _SECRET_KEYS
_CHECK_URL = "redis://validation-only"


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: str | None = None
    namespace: str = "pdserve"
    redis_password_file: str | None = None
    cluster_secret_file: str | None = None
    latency_window_s: float = Field(10.0, gt=0)
    workers: tuple[WorkerRole, ...] = (WorkerRole.PREFILL, WorkerRole.DECODE)
    router_drain_grace_s: float = Field(10.0, gt=0)
    router: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None) -> AppArgs:
        """Validated args; ValueError with every problem, in YAML terms."""
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as exc:
            raise ValueError(f"pdserve app args: {_describe(exc)}") from None

    @model_validator(mode="after")
    def _check(self) -> AppArgs:
        roles = set(self.workers)
        if len(roles) != len(self.workers) or not roles:
            raise ValueError("workers: list each of prefill, decode, colocated at most once")
        if (WorkerRole.PREFILL in roles) != (WorkerRole.DECODE in roles):
            raise ValueError("workers: prefill and decode come together (or use colocated)")
        bad = _MANAGED_ROUTER_KEYS & set(self.router)
        if bad:
            raise ValueError(f"router: {sorted(bad)} are set at the top level of args")
        self.router_config(redis_url=_CHECK_URL)
        return self

    @property
    def deployments(self) -> list[str]:
        return [ROUTER_DEPLOYMENT, *(DEPLOYMENT_OF_ROLE[r] for r in self.workers)]

    def router_config(
        self, *, redis_url: str | None = None, node_ip: str = "127.0.0.1"
    ) -> RouterConfig:
        data = dict(self.router)
        data["host"] = _host(data.get("host", AUTO_HOST), node_ip)
        data["redis_url"] = redis_url or self.redis_url
        data["namespace"] = self.namespace
        data.update(self._secret_files())
        try:
            return RouterConfig.from_mapping(data)
        except ValueError as exc:
            raise ValueError(f"router: {exc}") from None

    def worker_config(
        self,
        role: WorkerRole,
        section: Mapping[str, Any] | None,
        *,
        worker_id: str,
        redis_url: str | None = None,
        node_ip: str = "127.0.0.1",
    ) -> WorkerConfig:
        """One worker's config from its deployment's ``user_config``; ``auto`` → node_ip."""
        data = dict(section or {})
        bad = _MANAGED_WORKER_KEYS & set(data)
        if bad:
            raise ValueError(f"{DEPLOYMENT_OF_ROLE[role]}: {sorted(bad)} are set by pdserve")
        data["host"] = _host(data.get("host", AUTO_HOST), node_ip)
        kv = dict(data.get("kv_transfer") or {})
        kv["host"] = _host(kv.get("host", AUTO_HOST), node_ip)
        data["kv_transfer"] = kv
        data.update(
            role=role.value,
            worker_id=worker_id,
            redis_url=redis_url or self.redis_url,
            namespace=self.namespace,
            **self._secret_files(),
        )
        try:
            return WorkerConfig.from_mapping(data)
        except ValueError as exc:
            raise ValueError(f"{DEPLOYMENT_OF_ROLE[role]}: user_config: {exc}") from None

    def check_worker_config(self, role: WorkerRole, section: Mapping[str, Any] | None) -> None:
        """Validate a worker deployment's user_config against these args (pool exists)."""
        config = self.worker_config(role, section, worker_id="check", redis_url=_CHECK_URL)
        pools = [p.name for p in self.router_config(redis_url=_CHECK_URL).pools]
        if config.pool not in pools:
            raise ValueError(
                f"{DEPLOYMENT_OF_ROLE[role]}: pool {config.pool!r} is not a router pool {pools}"
            )

    def _secret_files(self) -> dict[str, str | None]:
        return {
            "redis_password_file": self.redis_password_file,
            "cluster_secret_file": self.cluster_secret_file,
        }

    def with_overrides(self, **changes: Any) -> AppArgs:
        """A copy with top-level keys, or router keys (``router_port=``,
        ``router_http_port=``, ``router_api_key_file=``), replaced; None keeps a value."""
        data = self.model_dump(mode="json")
        router = dict(data["router"])
        for name in ("port", "http_port", "api_key_file"):
            value = changes.pop(f"router_{name}", None)
            if value is not None:
                router[name] = value
        data["router"] = router
        data.update(changes)
        return AppArgs.parse(data)


def _host(value: Any, node_ip: str) -> str:
    return node_ip if value in (None, AUTO_HOST) else str(value)


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'args'}: {e['msg']}" for e in exc.errors()
    )
