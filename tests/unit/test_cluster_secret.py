"""The cluster secret's HMACs, secret files, and Redis URL redaction (no processes)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from common.cluster_secret import ClusterSecret, load_secret
from common.redis_client import read_password_file, redact_url, url_with_password


def test_secret_file_round_trip_is_owner_only_and_never_shown(tmp_path: Path) -> None:
    secret = ClusterSecret.generate()
    path = secret.write(tmp_path / "s" / "cluster.secret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_secret(path)
    assert again is not None and again.token() == secret.token()
    assert "***" in repr(secret) and path.read_text().strip() not in repr(secret)
    assert load_secret(None) is None


def test_signatures_are_bound_to_secret_purpose_and_data() -> None:
    a, b = ClusterSecret(b"a" * 32), ClusterSecret(b"b" * 32)
    sig = a.sign("worker", "payload")
    assert a.verify("worker", "payload", sig)
    assert not a.verify("worker", "payload2", sig)
    assert not a.verify("grpc", "payload", sig)  # another purpose
    assert not b.verify("worker", "payload", sig)  # another secret
    assert not a.verify("worker", "payload", None) and a.token() != b.token()


def test_bad_secret_files_fail_naming_the_path_only(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("tiny\n")
    with pytest.raises(ValueError, match="at least 16 bytes") as err:
        ClusterSecret.from_file(short)
    assert "tiny" not in str(err.value)
    with pytest.raises(ValueError, match="cannot read cluster secret file"):
        ClusterSecret.from_file(tmp_path / "missing")


def test_redis_urls_are_redacted_and_password_files_read(tmp_path: Path) -> None:
    assert redact_url("redis://:hunter2@10.0.0.1:6379/0") == "redis://:***@10.0.0.1:6379/0"
    assert redact_url("rediss://app:pw@h:1/2") == "rediss://app:***@h:1/2"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url(None) == "-"
    assert url_with_password("redis://127.0.0.1:1/0", "pw") == "redis://:pw@127.0.0.1:1/0"
    path = tmp_path / "pw"
    path.write_text("s3cret\n")
    assert read_password_file(path) == "s3cret" and read_password_file(None) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_password_file(tmp_path / "empty")


def test_worker_flags_and_yaml_reach_the_kv_transport() -> None:
    from common.worker_info import WorkerRole
    from worker.config import build_parser, parse_config

    argv = ["--cluster-secret-file", "/s/cluster", "--redis-password-file", "/s/redis"]
    config = parse_config(build_parser("w", "w"), argv, WorkerRole.PREFILL)
    assert config.cluster_secret_file == "/s/cluster"
    assert config.redis_password_file == "/s/redis"
    assert config.kv_transfer.cluster_secret_file == "/s/cluster"  # the joins prove it too


def test_router_flags() -> None:
    from router.__main__ import load_config, parse_args

    argv = ["--cluster-secret-file", "/s/c", "--redis-password-file", "/s/r"]
    config = load_config(parse_args(argv))
    assert (config.cluster_secret_file, config.redis_password_file) == ("/s/c", "/s/r")
