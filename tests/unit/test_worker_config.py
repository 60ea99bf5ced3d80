"""WorkerConfig: YAML and flags, later sources win, unknown keys and bad values refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.worker_info import WorkerRole
from worker.config import (
    PrefillFailurePolicy,
    WorkerConfig,
    build_parser,
    config_from_args,
)

YAML = """
role: decode
worker_id: d-7
pool: chat
port: 7000
redis_url: redis://127.0.0.1:6390/0
on_prefill_failure: fail
layer_wise: false
engine:
  num_kv_blocks: 300
  num_threads: 1
kv_transfer:
  port: 7100
  timeout_s: 12.5
"""


def parse(
    argv: list[str], role: WorkerRole = WorkerRole.DECODE, *allowed: WorkerRole
) -> WorkerConfig:
    args = build_parser("test", "test").parse_args(argv)
    return config_from_args(args, role, allowed)


def test_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(YAML)
    config = parse(["--config", str(path)])
    assert config.role is WorkerRole.DECODE and config.worker_id == "d-7" and config.pool == "chat"
    assert config.on_prefill_failure is PrefillFailurePolicy.FAIL and not config.layer_wise
    assert config.engine.num_kv_blocks == 300 and config.engine.num_threads == 1
    assert config.engine.block_size == 16  # untouched defaults survive
    assert config.engine.long_prefill_token_threshold == 512
    assert config.kv_transfer.port == 7100 and config.kv_transfer.timeout_s == 12.5
    assert config.redis_url == "redis://127.0.0.1:6390/0"


def test_flags_override_yaml(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(YAML)
    config = parse(
        [
            "--config",
            str(path),
            "--port",
            "0",
            "--num-kv-blocks",
            "64",
            "--layer-wise",
            "--no-prefix-caching",
            "--kv-timeout",
            "3",
            "--long-prefill-token-threshold",
            "0",
        ]
    )
    assert config.port == 0 and config.engine.num_kv_blocks == 64
    assert config.engine.long_prefill_token_threshold == 0
    assert config.engine.num_threads == 1  # from the file
    assert config.layer_wise and not config.engine.enable_prefix_caching
    assert config.kv_transfer.timeout_s == 3.0 and config.kv_transfer.port == 7100


def test_defaults_from_flags_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_REDIS_URL", "redis://127.0.0.1:1/0")
    config = parse(["--prefill-timeout", "2", "--on-prefill-failure", "local"], WorkerRole.PREFILL)
    assert config.role is WorkerRole.PREFILL and config.prefill_timeout_s == 2.0
    assert config.redis_url == "redis://127.0.0.1:1/0"
    assert config.worker_id == "" and config.metrics_port == 0


def test_role_must_suit_the_entry_point(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("role: colocated\n")
    assert parse(["--config", str(path)], WorkerRole.DECODE, WorkerRole.COLOCATED).role is (
        WorkerRole.COLOCATED
    )
    with pytest.raises(ValueError, match="runs prefill workers"):
        parse(["--config", str(path)], WorkerRole.PREFILL)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"role": "decode", "prot": 1}, "unknown keys"),
        ({"role": "decode", "engine": {"num_kv_block": 5}}, "unknown keys"),
        ({"role": "decode", "kv_transfer": {"tmeout_s": 5}}, "unknown keys"),
        ({"role": "router"}, "router"),
        ({}, "needs a role"),
        ({"role": "decode", "port": 70000}, "port out of range"),
        ({"role": "decode", "heartbeat_interval_s": 5.0}, "heartbeat"),
        ({"role": "decode", "prefill_timeout_s": 0}, "prefill_timeout_s"),
        ({"role": "decode", "on_prefill_failure": "retry"}, "retry"),
        ({"role": "decode", "engine": {"block_size": 0}}, "block_size"),
        ({"role": "decode", "engine": {"long_prefill_token_threshold": -1}}, "long_prefill"),
        ({"role": "decode", "engine": "big"}, "expected a mapping"),
        ({"role": "decode", "pool": ""}, "pool"),
    ],
)
def test_invalid_configs_are_refused(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkerConfig.from_mapping(data)


def test_only_decode_workers_take_transfers() -> None:
    assert WorkerConfig(role=WorkerRole.DECODE).takes_transfers
    assert not WorkerConfig(role=WorkerRole.COLOCATED).takes_transfers
    assert not WorkerConfig(role=WorkerRole.PREFILL).takes_transfers
