"""RouterConfig: YAML layout, defaults, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import DEFAULT_MODEL_NAME, Policy, RouterConfig

YAML = """
port: 0
redis_url: redis://127.0.0.1:1/0
default_pool: chat
pools:
  - name: code
    policy: round_robin
    load_weight: 0.5
  - name: chat
    max_model_len: 2048
semantic:
  threshold: 0.4
  routes:
    - name: code
      pool: code
      threshold: 0.3
      utterances: ["How do I sort a list in Python?", "Fix this stack trace"]
    - name: chitchat
      pool: chat
      utterances: ["How are you today?"]
limits:
  default_max_tokens: 64
"""


def test_yaml_layout(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(YAML)
    config = RouterConfig.from_yaml(path, port=1234)
    assert config.port == 1234 and config.redis_url == "redis://127.0.0.1:1/0"
    code_pool, chat_pool = config.pools
    assert (code_pool.name, chat_pool.name) == ("code", "chat")
    assert code_pool.policy is Policy.ROUND_ROBIN
    assert code_pool.load_weight == 0.5
    assert chat_pool.model == DEFAULT_MODEL_NAME
    assert chat_pool.max_model_len == 2048
    assert config.default_pool == "chat"
    code, chitchat = config.semantic.routes
    assert code.utterances == ("How do I sort a list in Python?", "Fix this stack trace")
    assert config.semantic.threshold_of(code) == 0.3
    assert config.semantic.threshold_of(chitchat) == 0.4
    assert config.limits.default_max_tokens == 64
    assert config.limits.max_messages == 1024


def test_defaults_serve_one_default_pool() -> None:
    config = RouterConfig()
    (pool,) = config.pools
    assert pool.name == "default" and config.default_pool == "default"
    assert pool.policy is Policy.PREFIX_AWARE
    assert not config.semantic.routes
    assert RouterConfig.from_mapping({"pools": [{"name": "a"}, {"name": "b"}]}).default_pool == "a"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"prot": 1}, "unknown keys ['prot']"),
        ({"pools": [{"name": "a", "polcy": "random"}]}, "unknown keys ['polcy']"),
        ({"pools": [{"name": "a", "policy": "fastest"}]}, "not one of"),
        ({"pools": []}, "at least one pool"),
        ({"pools": [{"name": "a"}, {"name": "a"}]}, "duplicate pool"),
        ({"pools": [{"name": "a", "model": "Other"}]}, "needs a model_path"),
        ({"default_pool": "nope"}, "default_pool"),
        (
            {"semantic": {"routes": [{"name": "r", "pool": "x", "utterances": ["a"]}]}},
            "unknown pool",
        ),
        (
            {"semantic": {"routes": [{"name": "r", "pool": "default", "utterances": []}]}},
            "utterances",
        ),
        ({"semantic": {"threshold": 2}}, "threshold"),
        ({"limits": {"max_messages": 0}}, "max_messages"),
        ({"port": 70000}, "port"),
        ({"http_port": -1}, "http_port"),
        ({"tls_cert_file": "c.pem"}, "go together"),
        ({"tls_client_ca_file": "ca.pem"}, "tls_client_ca_file"),
        ({"pools": "a"}, "expected a list"),
    ],
)
def test_bad_config_names_the_problem(data: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=None) as err:
        RouterConfig.from_mapping(data)
    assert needle in str(err.value)


def test_public_port_keys() -> None:
    assert RouterConfig().http_port == 8000 and RouterConfig().api_key_file is None
    config = RouterConfig.from_mapping(
        {"http_port": None, "api_key_file": "keys", "tls_cert_file": "c", "tls_key_file": "k"}
    )
    assert config.http_port is None and config.tls_client_ca_file is None
