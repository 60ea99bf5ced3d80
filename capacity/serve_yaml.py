"""A planned :class:`~capacity.plan_types.Candidate` as a Serve YAML, from a base file.

The base (deploy/serve-gpu.yaml for a GPU profile, deploy/serve.yaml for a CPU one, or
the operator's own file) keeps everything the planner does not decide: the router, engine
options, resources, health checks, Serve's delays. The planner sets only

- ``args.workers``: ``[prefill, decode]`` or ``[colocated]``;
- per worker deployment: ``num_replicas`` (fixed) or ``autoscaling_config`` with
  ``min_replicas`` / ``max_replicas`` and the policy targets (``policy_kwargs``);
- the router pools' overload gate (``max_in_flight`` / ``max_queued``), raised to the
  decode slots the fleet has (decode replicas at the peak × ``max_num_seqs``): the
  default 256 streams would otherwise cap a large fleet at the router, not the GPUs.

A colocated ``Worker`` deployment is derived from the base's DecodeWorker entry (it
decodes, and it is scaled by ``deploy.autoscaling:decode_policy``). The result is checked
with :meth:`deploy.serve_config.ServeConfig.check` — the same checks as ``pdserve check``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from capacity.plan_types import COLOCATED, Autoscale, Candidate
from deploy.serve_config import DEFAULT_CONFIG, IMPORT_PATH, ServeConfig

GPU_CONFIG = DEFAULT_CONFIG.with_name("serve-gpu.yaml")
_PREFILL, _DECODE, _COLOCATED = "PrefillWorker", "DecodeWorker", "Worker"
_DECODE_POLICY = "deploy.autoscaling:decode_policy"
_ENGINE_MAX_SEQS = 64  # engine/config.py's default max_num_seqs


def default_base(hardware: str) -> Path:
    """serve.yaml for a CPU profile, serve-gpu.yaml otherwise."""
    return DEFAULT_CONFIG if hardware.lower().startswith("cpu") else GPU_CONFIG


def candidate_config(candidate: Candidate, base: str | Path = GPU_CONFIG) -> ServeConfig:
    """The base Serve config with the candidate's layout and replica counts; checked."""
    data = yaml.safe_load(Path(base).read_text())
    app = _app(data)
    entries = {e.get("name"): e for e in app.get("deployments") or []}
    decode_entry = copy.deepcopy(entries.get(_DECODE) or entries.get(_COLOCATED) or {})
    if candidate.layout == COLOCATED:
        app["args"]["workers"] = ["colocated"]
        worker = copy.deepcopy(entries.get(_COLOCATED) or decode_entry)
        worker["name"] = _COLOCATED
        _set_count(worker, candidate.prefill, candidate.prefill_scaling)
        kept = [e for e in app["deployments"] if e.get("name") not in (_PREFILL, _DECODE)]
        app["deployments"] = [e for e in kept if e.get("name") != _COLOCATED] + [worker]
    else:
        app["args"]["workers"] = ["prefill", "decode"]
        for name, count, scaling in (
            (_PREFILL, candidate.prefill, candidate.prefill_scaling),
            (_DECODE, candidate.decode, candidate.decode_scaling),
        ):
            if name not in entries:
                raise ValueError(f"{base}: the base config has no {name} deployment")
            _set_count(entries[name], count, scaling)
        app["deployments"] = [e for e in app["deployments"] if e.get("name") != _COLOCATED]
    _size_router(app, candidate, decode_entry)
    config = ServeConfig(data)
    config.check()
    return config


def write_config(config: ServeConfig, path: str | Path, header: str = "") -> Path:
    """Write the config as YAML with a comment header (what was planned, and why)."""
    path = Path(path)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comment + yaml.safe_dump(config.data, sort_keys=False))
    return path


def _app(data: dict[str, Any]) -> dict[str, Any]:
    for app in data.get("applications") or []:
        if app.get("import_path") == IMPORT_PATH:
            app.setdefault("args", {})
            app.setdefault("deployments", [])
            return app
    raise ValueError(f"the base config has no application with import_path {IMPORT_PATH}")


def _size_router(app: dict[str, Any], candidate: Candidate, decode: dict[str, Any]) -> None:
    """Raise each router pool's gate to the fleet's decode slots (never lower it)."""
    engine = (decode.get("user_config") or {}).get("engine") or {}
    seqs = int(engine.get("max_num_seqs", _ENGINE_MAX_SEQS))
    replicas = candidate.decode or candidate.prefill  # colocated workers decode too
    slots = replicas * seqs
    for pool in (app["args"].get("router") or {}).get("pools") or []:
        pool["max_in_flight"] = max(int(pool.get("max_in_flight", 256)), slots)
        pool["max_queued"] = max(int(pool.get("max_queued", 512)), slots)


def _set_count(entry: dict[str, Any], count: int, scaling: Autoscale | None) -> None:
    """Fixed ``num_replicas``, or the autoscaling bounds and targets (base delays kept)."""
    if scaling is None:
        entry.pop("autoscaling_config", None)
        entry["num_replicas"] = count
        return
    entry.pop("num_replicas", None)
    auto = entry.setdefault("autoscaling_config", {})
    auto["min_replicas"] = scaling.min_replicas
    auto["max_replicas"] = scaling.max_replicas
    policy = auto.setdefault("policy", {"policy_function": _DECODE_POLICY})
    kwargs = dict(policy.get("policy_kwargs") or {})
    kwargs.update(dict(scaling.targets))
    policy["policy_kwargs"] = kwargs
