"""The Serve application builder: ``import_path: deploy.app:build_app`` in serve.yaml.

``serve deploy deploy/serve.yaml`` (or ``pdserve up``) calls :func:`build_app` with the
application's ``args``; it validates them (:class:`~deploy.app_config.AppArgs`) and binds
the deployments: the Router as ingress, with the worker deployments ``args.workers``
names (PrefillWorker + DecodeWorker, and/or the colocated Worker) bound into it so Serve
owns them as part of the same application. Each worker deployment's own config is its
``user_config`` in serve.yaml (applied by Serve, per deployment).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from common.worker_info import WorkerRole
from deploy.app_config import AppArgs
from deploy.deployments import DecodeWorker, PrefillWorker, Router, Worker

_DEPLOYMENTS = {
    WorkerRole.PREFILL: PrefillWorker,
    WorkerRole.DECODE: DecodeWorker,
    WorkerRole.COLOCATED: Worker,
}


def build_app(args: dict[str, Any] | None = None) -> Application:
    spec = AppArgs.parse(args)
    data = spec.model_dump(mode="json")
    workers = [_DEPLOYMENTS[role].bind(data) for role in spec.workers]
    return Router.bind(data, *workers)
