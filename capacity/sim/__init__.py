"""Discrete-event simulator of a pdserve cluster (issue 17; contract: the capacity API).

    config = sim_config_from_serve("deploy/serve.yaml")
    result = simulate(config, Profile.load(path), requests, seed=0)
    result.run_entry("label", slo)        # one results.json run, bench-run schema

Modules, one noun each: :mod:`~capacity.sim.request` (SimRequest), :mod:`.config`
(SimConfig from a Serve YAML), :mod:`.events` (the loop), :mod:`.blocks` (a replica's
block pool + prefix cache), :mod:`.steps` (decode runs in closed form), :mod:`.replica`
(one engine), :mod:`.router` (the real router code over simulated replicas),
:mod:`.autoscale` (the real Serve policies, Serve's delays), :mod:`.cluster` (wiring and
the request lifecycle), :mod:`.result` (records and results.json), :mod:`.run`
(``simulate``). Torch-free.
"""

from __future__ import annotations

from capacity.sim.config import SimConfig, sim_config_from_serve
from capacity.sim.options import SimOptions
from capacity.sim.request import SimRequest
from capacity.sim.result import SimResult
from capacity.sim.run import simulate

__all__ = [
    "SimConfig",
    "SimOptions",
    "SimRequest",
    "SimResult",
    "sim_config_from_serve",
    "simulate",
]
