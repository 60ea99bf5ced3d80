"""deploy/cluster.yaml: Ray's cluster schema, and the points that make it boot safely.

- Ray's own ``prepare_config`` + ``validate_config`` (what ``ray up`` runs first), offline;
- the image is Ray's, pinned to the installed Ray and to this Python (3.11);
- Redis: password from the secret file, private bind, protected mode — checked on the text
  *and* by running the YAML's own Redis commands against a real redis-server on loopback;
- model weights are staged (a mounted model directory, optionally synced from S3).
"""

from __future__ import annotations

import copy
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.launch import free_loopback_port
from deploy.local_ray import pin_to_loopback

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "deploy" / "cluster.yaml"
PASSWORD_FILE = "~/.pdserve/secrets/redis.password"
_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d+)-(?P<kind>cpu|gpu|cu\d+)$")


def _load() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _redis_commands(config: dict[str, Any]) -> list[str]:
    """The head's start commands that manage Redis (not the `ray start` line)."""
    return [
        c
        for c in config["head_start_ray_commands"]
        if "redis-server" in c or "redis-cli" in c or "redis.conf" in c or "redis.password" in c
    ]


def redis_exposure_problems(config: dict[str, Any]) -> list[str]:
    """What would leave the registry's Redis open; [] when it is locked down."""
    text = "\n".join(_redis_commands(config))
    problems = []
    if not text:
        problems.append("no Redis start command on the head")
    if "0.0.0.0" in text or re.search(r"bind\s+\*", text):
        problems.append("Redis binds every interface")
    if re.search(r"protected-mode\s+no", text):
        problems.append("protected mode off")
    if f'requirepass %s\\n\' "$(cat {PASSWORD_FILE})"' not in text:
        problems.append("requirepass not read from the secret file")
    if re.search(r"requirepass\s+(?!%s)\S", text):
        problems.append("a literal password in the YAML")
    return problems


def test_validates_against_rays_cluster_schema() -> None:
    pin_to_loopback()
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_load())
    validate_config(config)
    assert config["docker"]["container_name"] == "pdserve"


def test_images_are_rays_pinned_to_our_ray_and_python() -> None:
    import ray

    docker = _load()["docker"]
    ours = f"{sys.version_info.major}{sys.version_info.minor}"
    assert ours == "311", "the project targets Python 3.11"
    for key in ("image", "head_image", "worker_image"):
        match = _IMAGE.match(docker[key])
        assert match, f"docker.{key} is not a pinned rayproject/ray image: {docker[key]}"
        assert match["ray"] == ray.__version__, f"docker.{key} pins Ray {match['ray']}"
        assert match["py"] == ours, f"docker.{key} has Python {match['py']}"
    assert _IMAGE.match(docker["worker_image"])["kind"] != "cpu"  # type: ignore[index]
    setup = " ".join(_load()["setup_commands"])
    assert f"ray[default,serve]=={ray.__version__}" in setup  # the project's pin, unchanged


def test_every_node_type_names_an_ami_with_docker() -> None:
    for name, node in _load()["available_node_types"].items():
        image_id = node["node_config"].get("ImageId", "")
        assert image_id, f"{name}: no ImageId, Ray would fall back to its old default AMI"
        assert image_id.startswith(("ami-", "resolve:ssm:")), image_id


def test_redis_is_locked_down() -> None:
    assert redis_exposure_problems(_load()) == []


def test_the_check_catches_an_open_redis() -> None:
    config = copy.deepcopy(_load())
    config["head_start_ray_commands"] = [
        "ray stop",
        "redis-server --port 6380 --bind 0.0.0.0 --protected-mode no --daemonize yes",
    ]
    problems = redis_exposure_problems(config)
    assert "Redis binds every interface" in problems
    assert "protected mode off" in problems
    assert "requirepass not read from the secret file" in problems


def test_model_weights_are_staged() -> None:
    config = _load()
    mounts = config["file_mounts"]
    assert mounts.get("~/.pdserve/models") == "~/.pdserve/models"
    setup = "\n".join(config["setup_commands"])
    assert "aws s3 sync" in setup and "~/.pdserve/models" in setup
    assert "pip install -q -e ~/pdserve" in setup


def test_routers_are_reachable_on_documented_ports() -> None:
    readme = (CLUSTER_YAML.parent / "README.md").read_text()
    section = readme.split("## From `ray up` to a serving cluster", 1)[1].split("\n## ", 1)[0]
    assert "50051" in section and "8000" in section and "load balancer" in section


# ---- the YAML's Redis commands, run for real ------------------------------------------------


def _run_redis_commands(home: Path, port: int) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HOME": str(home),
        "PDSERVE_PRIVATE_IP": "127.0.0.1",  # stands in for the head's private address
        "PDSERVE_REDIS_PORT": str(port),
    }
    script = "set -e\n" + "\n".join(_redis_commands(_load()))
    return subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30
    )


def _stop(home: Path) -> None:
    pidfile = home / ".pdserve" / "redis.pid"
    if pidfile.exists():
        pid = int(pidfile.read_text().strip())
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            return
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def test_the_redis_commands_start_a_password_protected_private_redis(tmp_path: Path) -> None:
    import redis

    secrets = tmp_path / ".pdserve" / "secrets"
    secrets.mkdir(parents=True)
    password = "s3cret-" + os.urandom(8).hex()
    (secrets / "redis.password").write_text(password + "\n")
    port = free_loopback_port()
    try:
        done = _run_redis_commands(tmp_path, port)
        assert done.returncode == 0, done.stderr
        conf = tmp_path / ".pdserve" / "redis.conf"
        assert conf.stat().st_mode & 0o777 == 0o600
        pid = int(_wait_for(tmp_path / ".pdserve" / "redis.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert password not in cmdline
        anonymous = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=5)
        assert client.ping()
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("protected-mode")["protected-mode"] == "yes"
        # Nothing listens on the wildcard address at that port.
        with socket.socket() as s:
            s.settimeout(1)
            assert s.connect_ex(("127.0.0.2", port)) != 0
        client.close()
        anonymous.close()
    finally:
        _stop(tmp_path)


def test_the_redis_commands_refuse_to_start_without_a_password(tmp_path: Path) -> None:
    done = _run_redis_commands(tmp_path, free_loopback_port())
    assert done.returncode != 0
    assert "missing ~/.pdserve/secrets/redis.password" in done.stderr
    assert not (tmp_path / ".pdserve" / "redis.pid").exists()


def _wait_for(path: Path, timeout_s: float = 10.0) -> Path:
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.read_text().strip():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)
    return path
