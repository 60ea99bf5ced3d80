"""serve.yaml as pdserve reads it: Serve's schema, plus the checks Serve cannot make.

``serve deploy`` validates the file against Serve's ``ServeDeploySchema`` and builds the
app on the cluster, where a bad ``args`` key or policy target surfaces late, as a failed
deployment or a silently stuck autoscaler. :meth:`ServeConfig.load` runs all of it up
front, on the operator's machine:

- the file against ``ServeDeploySchema`` (exactly what ``serve deploy`` accepts), plus
  no unknown keys (Serve silently ignores a misspelt ``num_replica``);
- one application whose ``import_path`` is ``deploy.app:build_app``;
- its ``args`` (:class:`~deploy.app_config.AppArgs`);
- every ``deployments:`` entry names a deployment the args create;
- each worker deployment's ``user_config`` (a WorkerConfig, in one of the router's pools);
- the ``policy_kwargs`` of pdserve's own policies (:mod:`deploy.scaling`);
- each worker deployment's ``graceful_shutdown_timeout_s`` leaves room for its
  ``drain_grace_s`` (otherwise Serve kills a draining replica mid-stream).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from common.worker_info import WorkerRole
from deploy.app_config import (
    DEPLOYMENT_OF_ROLE,
    ROUTER_DEPLOYMENT,
    ROUTER_SHUTDOWN_TIMEOUT_S,
    WORKER_SHUTDOWN_TIMEOUT_S,
    AppArgs,
)
from deploy.scaling import DecodeTargets, PrefillTargets, parse_targets

IMPORT_PATH = "deploy.app:build_app"
DEFAULT_CONFIG = Path(__file__).with_name("serve.yaml")
_POLICY_TARGETS = {
    "deploy.autoscaling:prefill_policy": PrefillTargets,
    "deploy.autoscaling:decode_policy": DecodeTargets,
}
_DRAIN_MARGIN_S = 5.0  # worker stop + server stop after the in-flight grace


@dataclass(frozen=True)
class ServeConfig:
    data: dict[str, Any]  # the YAML document, as Serve will receive it

    @classmethod
    def load(cls, path: str | Path = DEFAULT_CONFIG) -> ServeConfig:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        config = cls(data)
        config.check()
        return config

    @property
    def app(self) -> dict[str, Any]:
        """The pdserve application's entry in ``applications``."""
        apps = [
            a for a in self.data.get("applications") or [] if a.get("import_path") == IMPORT_PATH
        ]
        if len(apps) != 1:
            raise ValueError(f"need exactly one application with import_path {IMPORT_PATH}")
        return apps[0]

    @property
    def app_name(self) -> str:
        return str(self.app.get("name", "default"))

    @property
    def args(self) -> AppArgs:
        return AppArgs.parse(self.app.get("args"))

    def with_args(self, args: AppArgs) -> ServeConfig:
        data = copy.deepcopy(self.data)
        for app in data["applications"]:
            if app.get("import_path") == IMPORT_PATH:
                app["args"] = args.model_dump(mode="json")
        config = ServeConfig(data)
        config.check()
        return config

    def deployment(self, name: str) -> dict[str, Any]:
        """The ``deployments:`` entry of ``name`` ({} if the file leaves it at defaults)."""
        for entry in self.app.get("deployments") or []:
            if entry.get("name") == name:
                return entry
        return {}

    def schema(self) -> Any:
        """The document as Serve's ``ServeDeploySchema`` (what ``deploy_apps`` takes)."""
        from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

        try:
            schema = ServeDeploySchema.model_validate(self.data)
        except ValidationError as exc:
            raise ValueError(f"not a valid Serve config: {exc}") from None
        _reject_unknown(self.data, ServeDeploySchema, "the file")
        for app in self.data.get("applications") or []:
            where = f"applications: {app.get('name', 'default')}"
            _reject_unknown(app, ServeApplicationSchema, where)
            for entry in app.get("deployments") or []:
                _reject_unknown(entry, DeploymentSchema, f"{where}: {entry.get('name')}")
        return schema

    def worker_section(self, role: WorkerRole) -> dict[str, Any]:
        """The ``user_config`` of the role's deployment ({} when the file sets none)."""
        entry = self.deployment(DEPLOYMENT_OF_ROLE[role])
        if "user_config" in entry and not isinstance(entry["user_config"], dict):
            raise ValueError(
                f"deployments: {DEPLOYMENT_OF_ROLE[role]}: user_config must be a mapping "
                "(the worker's config)"
            )
        return dict(entry.get("user_config") or {})

    def check(self) -> None:
        """Raise ValueError naming the first problem (see the module doc)."""
        self.schema()
        args = self.args
        known = set(args.deployments)
        for entry in self.app.get("deployments") or []:
            name = entry.get("name")
            if name not in known:
                raise ValueError(f"deployments: {name!r} is not in this app {sorted(known)}")
            policy = (entry.get("autoscaling_config") or {}).get("policy") or {}
            targets = _POLICY_TARGETS.get(policy.get("policy_function", ""))
            if targets is not None:
                try:
                    parse_targets(targets, policy.get("policy_kwargs"))
                except ValueError as exc:
                    raise ValueError(f"deployments: {name}: policy_kwargs: {exc}") from None
        self._check_shutdown(
            ROUTER_DEPLOYMENT, args.router_drain_grace_s, ROUTER_SHUTDOWN_TIMEOUT_S
        )
        for role in args.workers:
            section = self.worker_section(role)
            args.check_worker_config(role, section)
            grace = args.worker_config(role, section, worker_id="check").drain_grace_s
            self._check_shutdown(DEPLOYMENT_OF_ROLE[role], grace, WORKER_SHUTDOWN_TIMEOUT_S)

    def min_cpus(self) -> int:
        """CPUs the app needs at its smallest (min_replicas / num_replicas of each)."""
        total = 0.0
        for name in self.args.deployments:
            entry = self.deployment(name)
            scaling = entry.get("autoscaling_config")
            replicas = scaling.get("min_replicas", 1) if scaling else entry.get("num_replicas", 1)
            bundles = entry.get("placement_group_bundles")
            if bundles:
                per_replica = sum(float(b.get("CPU", 0)) for b in bundles)
            else:
                per_replica = float((entry.get("ray_actor_options") or {}).get("num_cpus", 1))
            total += per_replica * int(replicas)
        return max(1, math.ceil(total))

    def describe(self) -> str:
        """One line per deployment, for `pdserve check`."""
        lines = [f"app {self.app_name}: workers {', '.join(r.value for r in self.args.workers)}"]
        for name in self.args.deployments:
            entry = self.deployment(name)
            scaling = entry.get("autoscaling_config")
            count = (
                f"{scaling.get('min_replicas', 1)}..{scaling.get('max_replicas', 1)} replicas"
                if scaling
                else f"{entry.get('num_replicas', 1)} replica(s)"
            )
            resources = entry.get("ray_actor_options") or {}
            lines.append(f"  {name}: {count}, {resources or 'default resources'}")
        return "\n".join(lines)

    def _check_shutdown(self, name: str, grace_s: float, default_s: float) -> None:
        shutdown = self.deployment(name).get("graceful_shutdown_timeout_s", default_s)
        if shutdown < grace_s + _DRAIN_MARGIN_S:
            raise ValueError(
                f"deployments: {name}: graceful_shutdown_timeout_s={shutdown} must be at least "
                f"its drain grace + {_DRAIN_MARGIN_S:g} ({grace_s + _DRAIN_MARGIN_S:g}), or "
                "Serve kills it while it drains"
            )


def _reject_unknown(data: dict[str, Any], schema: Any, where: str) -> None:
    unknown = sorted(set(data) - set(schema.model_fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}")
