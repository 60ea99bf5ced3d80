"""deploy/*.yaml against Ray's own schemas, and pdserve's checks on top of them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.worker_info import WorkerRole
from deploy.app_config import AppArgs
from deploy.local_ray import pin_to_loopback
from deploy.serve_config import ServeConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SERVE_FILES = ["serve.yaml", "serve-gpu.yaml"]


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / name).read_text())


def _deployment(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in data["applications"][0]["deployments"] if d["name"] == name)


# ---- cluster.yaml ----------------------------------------------------------------------------


def test_cluster_yaml_validates_against_rays_schema() -> None:
    pin_to_loopback()
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_load("cluster.yaml"))  # what `ray up` does before validating
    validate_config(config)
    head = config["head_node_type"]
    gpu_types = [n for n in config["available_node_types"] if n != head]
    assert gpu_types
    for name in gpu_types:
        node = config["available_node_types"][name]
        assert 0 <= node["min_workers"] <= node["max_workers"]
        assert node["node_config"]["InstanceType"].startswith("g")  # a GPU instance
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "~/pdserve" in setup and "prepare_model" in setup


def test_a_broken_cluster_yaml_is_rejected() -> None:
    pin_to_loopback()
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    data = _load("cluster.yaml")
    data["available_node_types"]["gpu-1x"]["min_worker"] = 1  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(data))


# ---- serve.yaml ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVE_FILES)
def test_serve_files_pass_serves_schema_and_ours(name: str) -> None:
    config = ServeConfig.load(DEPLOY / name)
    assert config.app_name == "pdserve"
    assert config.app["import_path"] == "deploy.app:build_app"
    assert set(config.args.deployments) == {"Router", "PrefillWorker", "DecodeWorker"}
    prefill = config.deployment("PrefillWorker")["autoscaling_config"]["policy"]
    decode = config.deployment("DecodeWorker")["autoscaling_config"]["policy"]
    assert prefill["policy_function"] == "deploy.autoscaling:prefill_policy"
    assert decode["policy_function"] == "deploy.autoscaling:decode_policy"


def test_local_serve_yaml_fits_two_cpus() -> None:
    config = ServeConfig.load(DEPLOY / "serve.yaml")
    cpus = sum(
        config.deployment(name)["ray_actor_options"]["num_cpus"]
        for name in ("Router", "PrefillWorker", "DecodeWorker")
    )
    assert cpus <= 2
    assert config.min_cpus() == 2  # local Ray gets at least this many logical CPUs
    for role in (WorkerRole.PREFILL, WorkerRole.DECODE):
        worker = config.args.worker_config(role, config.worker_section(role), worker_id="w")
        assert worker.host == "127.0.0.1" and worker.kv_transfer.host == "127.0.0.1"
        assert worker.engine.num_threads == 1


def _broken(change: Any) -> dict[str, Any]:
    data = copy.deepcopy(_load("serve.yaml"))
    change(data)
    return data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["applications"][0]["args"].update(wokers=["prefill"]), "wokers"),
        (lambda d: d["applications"][0]["args"].update(workers=["prefill"]), "together"),
        (lambda d: d["applications"][0]["deployments"].append({"name": "Worker"}), "Worker"),
        (
            lambda d: _deployment(d, "PrefillWorker")["autoscaling_config"]["policy"][
                "policy_kwargs"
            ].update(ttft_ms=5),
            "ttft_ms",
        ),
        (
            lambda d: _deployment(d, "DecodeWorker").update(graceful_shutdown_timeout_s=10),
            "graceful_shutdown_timeout_s",
        ),
        (lambda d: _deployment(d, "DecodeWorker")["user_config"].update(pool="x"), "pool"),
        (lambda d: _deployment(d, "DecodeWorker")["user_config"].update(role="x"), "role"),
        (lambda d: _deployment(d, "DecodeWorker")["user_config"].update(enigne={}), "enigne"),
        (lambda d: _deployment(d, "Router").update(num_replica=1), "num_replica"),
        (lambda d: d["applications"][0]["args"]["router"].update(redis_url="x"), "redis_url"),
        (lambda d: d["applications"][0]["args"].update(router_drain_grace_s=60), "Router"),
    ],
)
def test_config_mistakes_are_caught_before_deploying(change: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServeConfig(_broken(change)).check()


def test_overrides_keep_the_rest_of_the_file() -> None:
    config = ServeConfig.load(DEPLOY / "serve.yaml")
    args = config.args.with_overrides(redis_url="redis://127.0.0.1:1/0", router_port=0)
    changed = config.with_args(args)
    assert changed.args.redis_url == "redis://127.0.0.1:1/0"
    assert changed.args.router_config().port == 0
    assert changed.deployment("PrefillWorker") == config.deployment("PrefillWorker")
    assert config.args.redis_url is None  # the original is untouched


# ---- args ------------------------------------------------------------------------------------


def test_auto_hosts_become_the_node_ip() -> None:
    args = AppArgs.parse({"router": {"host": "auto", "port": 0}})
    assert args.router_config(redis_url="redis://r", node_ip="10.0.0.7").host == "10.0.0.7"
    worker = args.worker_config(
        WorkerRole.DECODE, {"kv_transfer": {"port": 0}}, worker_id="w", node_ip="10.0.0.7"
    )
    assert (worker.host, worker.kv_transfer.host) == ("10.0.0.7", "10.0.0.7")
    fixed = args.worker_config(WorkerRole.PREFILL, {"host": "0.0.0.0"}, worker_id="w")
    assert fixed.host == "0.0.0.0"


def test_colocated_only_app() -> None:
    args = AppArgs.parse({"workers": ["colocated"]})
    assert args.deployments == ["Router", "Worker"]
    assert args.worker_config(WorkerRole.COLOCATED, {}, worker_id="w").role is WorkerRole.COLOCATED


def test_pdserve_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deploy.cli import main

    assert main(["check"]) == 0
    assert "PrefillWorker: 1..2 replicas" in capsys.readouterr().out
    bad = tmp_path / "serve.yaml"
    bad.write_text(yaml.safe_dump(_broken(lambda d: _deployment(d, "Router").update(x=1))))
    assert main(["check", "--config", str(bad)]) == 1
    assert "unknown keys ['x']" in capsys.readouterr().err
