"""Configuration of one worker process (prefill, decode or colocated), from YAML and flags.

One frozen dataclass, :class:`WorkerConfig`, composed of the engine's own
:class:`~engine.config.EngineConfig` and the KV transport's
:class:`~kv_transfer.types.TransferConfig` (both torch-free, both validate themselves)
plus what the worker process adds: identity, addresses, registry, failure policy, drain.

Sources, later wins: defaults → the YAML file (``--config``) → command-line flags. Unknown
keys are errors, not silently ignored, so a typo never runs a worker with a default.
YAML layout (every key optional)::

    role: decode                # prefill | decode | colocated
    worker_id: decode-0         # "" = generated at start-up, unique per process
    pool: default
    host: 127.0.0.1             # gRPC (and metrics) bind address
    port: 0                     # 0 = a free port; the ready line prints the real one
    metrics_port: 0             # null = no /metrics endpoint
    redis_url: redis://127.0.0.1:6379/0   # null = no registry (standalone worker);
                                # redis://:PASSWORD@host:port/0, rediss:// for TLS
    redis_password_file: null   # Redis password, one line (when the URL carries none)
    cluster_secret_file: null   # the cluster secret: worker RPCs, registration, KV joins
    namespace: pdserve
    heartbeat_interval_s: 0.25
    heartbeat_ttl_s: 3.0
    drain_grace_s: 30.0         # SIGTERM: how long in-flight requests may still run
    prefill_timeout_s: 30.0     # decode: Prefill RPC + KV landing, then the fallback
    on_prefill_failure: local   # decode: local (prefill here) | fail (UNAVAILABLE)
    layer_wise: true            # decode: ask prefill workers for layer-wise KV sends
    max_active_requests: null   # requests started at once; null = engine.max_num_seqs
    admission_queue_size: 256   # accepted, not started yet; past it RESOURCE_EXHAUSTED
    engine: {num_kv_blocks: 512, num_threads: 1, ...}   # EngineConfig fields
    kv_transfer: {host: 127.0.0.1, port: 0, timeout_s: 30.0, ...}  # TransferConfig fields
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from common import env
from common.worker_info import WorkerRole
from engine.config import EngineConfig
from kv_transfer.types import TransferConfig


class PrefillFailurePolicy(StrEnum):
    """What a decode worker does when its prefill worker fails or times out."""

    LOCAL = "local"  # free the reservation and prefill here: the request still completes
    FAIL = "fail"  # fail the Decode call with UNAVAILABLE (the router retries elsewhere)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    role: WorkerRole
    worker_id: str = ""  # "" = generated at start-up
    pool: str = "default"
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = 0
    redis_url: str | None = None
    redis_password_file: str | None = None
    # The cluster secret (common.cluster_secret): callers of this worker's RPCs, its
    # registration's readers and its KV peers must hold it. None = an open worker.
    cluster_secret_file: str | None = None
    namespace: str = "pdserve"
    heartbeat_interval_s: float = 0.25
    heartbeat_ttl_s: float = 3.0
    drain_grace_s: float = 30.0
    prefill_timeout_s: float = 30.0
    on_prefill_failure: PrefillFailurePolicy = PrefillFailurePolicy.LOCAL
    layer_wise: bool = True
    # Overload control (common.admission_gate): at most ``max_active_requests`` requests
    # past admission (None: the engine's max_num_seqs), ``admission_queue_size`` more
    # waiting in priority / fair order; the next is refused with RESOURCE_EXHAUSTED.
    max_active_requests: int | None = None
    admission_queue_size: int = 256
    engine: EngineConfig = field(default_factory=EngineConfig)
    kv_transfer: TransferConfig = field(default_factory=TransferConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", WorkerRole(self.role))
        object.__setattr__(
            self, "on_prefill_failure", PrefillFailurePolicy(self.on_prefill_failure)
        )
        if not self.pool:
            raise ValueError("pool must be non-empty")
        if self.cluster_secret_file and self.kv_transfer.cluster_secret_file is None:
            # One key in the YAML; the KV transport reads the same file for its joins.
            kv = dataclasses.replace(self.kv_transfer, cluster_secret_file=self.cluster_secret_file)
            object.__setattr__(self, "kv_transfer", kv)
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 65536:
                raise ValueError(f"{name} out of range: {value}")
        if not 0 < self.heartbeat_interval_s < self.heartbeat_ttl_s:
            raise ValueError("need 0 < heartbeat_interval_s < heartbeat_ttl_s")
        if self.max_active_requests is not None and self.max_active_requests < 1:
            raise ValueError(f"max_active_requests must be >= 1, got {self.max_active_requests}")
        if self.admission_queue_size < 0:
            raise ValueError(f"admission_queue_size must be >= 0, got {self.admission_queue_size}")
        for name in ("drain_grace_s", "prefill_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def active_limit(self) -> int:
        """Requests past admission at once: the explicit limit, else the batch cap."""
        return self.max_active_requests or self.engine.max_num_seqs

    @property
    def takes_transfers(self) -> bool:
        """Only a decode worker runs a KV receiver; prefill workers send, colocated neither."""
        return self.role is WorkerRole.DECODE

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> WorkerConfig:
        """Build from a YAML-shaped mapping; ValueError names any unknown or bad key."""
        data = dict(data)
        _reject_unknown(data, {f.name for f in dataclasses.fields(cls)}, "worker config")
        if "role" not in data:
            raise ValueError("worker config needs a role (prefill | decode | colocated)")
        for key, kind in (("engine", EngineConfig), ("kv_transfer", TransferConfig)):
            section = data.get(key) or {}
            if not isinstance(section, Mapping):
                raise ValueError(f"{key}: expected a mapping, got {section!r}")
            _reject_unknown(section, {f.name for f in dataclasses.fields(kind)}, key)
            data[key] = kind(**section)
        try:
            return cls(**data)
        except TypeError as exc:  # a wrong type that the constructors did not catch
            raise ValueError(str(exc)) from exc

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> WorkerConfig:
        return cls.from_mapping(_merge(load_yaml(path), overrides))


def load_yaml(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


# ---- command line ---------------------------------------------------------------------------

# flag → (dotted key in the YAML layout, type, help). Flags default to "not given", so a
# flag overrides the YAML file only when it is on the command line.
_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--worker-id", "worker_id", str, "unique worker id (default: generated)"),
    ("--pool", "pool", str, "routing pool"),
    ("--host", "host", str, "gRPC and metrics bind address"),
    ("--port", "port", int, "gRPC port (0 = free port)"),
    ("--metrics-port", "metrics_port", int, "Prometheus /metrics port (0 = free port)"),
    ("--redis-url", "redis_url", str, "registry Redis URL (default: $PDSERVE_REDIS_URL)"),
    ("--redis-password-file", "redis_password_file", str, "file holding the Redis password"),
    ("--cluster-secret-file", "cluster_secret_file", str, "file holding the cluster secret"),
    ("--namespace", "namespace", str, "registry key namespace"),
    ("--heartbeat-interval", "heartbeat_interval_s", float, "seconds between heartbeats"),
    ("--heartbeat-ttl", "heartbeat_ttl_s", float, "registration expiry in seconds"),
    ("--drain-grace", "drain_grace_s", float, "seconds in-flight work may run on SIGTERM"),
    ("--prefill-timeout", "prefill_timeout_s", float, "decode: Prefill RPC + KV landing bound"),
    ("--on-prefill-failure", "on_prefill_failure", str, "decode: local | fail"),
    ("--max-active-requests", "max_active_requests", int, "requests started at once"),
    ("--admission-queue-size", "admission_queue_size", int, "requests queued before refusal"),
    ("--model", "engine.model", str, "local HF checkpoint directory (default: SmolLM2-135M)"),
    ("--dtype", "engine.dtype", str, "auto (bf16 if native) | float32 | bfloat16 | float16"),
    ("--device", "engine.device", str, "cpu | cuda[:N]"),
    ("--block-size", "engine.block_size", int, "tokens per KV block"),
    ("--num-kv-blocks", "engine.num_kv_blocks", int, "KV cache size in blocks"),
    ("--kv-cache-gib", "engine.kv_cache_gib", float, "KV cache size in GiB"),
    ("--kv-cache-order", "engine.kv_cache_order", str, "layer_first | page_first"),
    ("--kv-cache-dtype", "engine.kv_cache_dtype", str, "auto (model dtype) | fp8 | int8"),
    ("--quantization", "engine.quantization", str, "weights: none | int8 (weight-only)"),
    ("--max-model-len", "engine.max_model_len", int, "context length cap"),
    ("--max-num-seqs", "engine.max_num_seqs", int, "running batch cap"),
    ("--max-num-batched-tokens", "engine.max_num_batched_tokens", int, "per-step token budget"),
    (
        "--long-prefill-token-threshold",
        "engine.long_prefill_token_threshold",
        int,
        "longer prefills share steps with shorter arrivals (0 = strict FIFO)",
    ),
    ("--num-threads", "engine.num_threads", int, "torch intra-op threads"),
    ("--seed", "engine.seed", int, "sampling seed of unseeded requests"),
    ("--speculative-method", "engine.speculative_method", str, "none | ngram | draft"),
    ("--num-speculative-tokens", "engine.num_speculative_tokens", int, "drafts per verify"),
    ("--draft-model", "engine.draft_model", str, "draft checkpoint (speculative 'draft')"),
    ("--prompt-lookup-min", "engine.prompt_lookup_min", int, "shortest n-gram to match"),
    ("--prompt-lookup-max", "engine.prompt_lookup_max", int, "longest n-gram to match"),
    ("--kv-host", "kv_transfer.host", str, "KV transfer bind address"),
    ("--kv-port", "kv_transfer.port", int, "decode: KV receiver port (0 = free port)"),
    ("--kv-timeout", "kv_transfer.timeout_s", float, "default KV transfer deadline"),
    ("--kv-max-pair-groups", "kv_transfer.max_pair_groups", int, "KV group cap, 0: none"),
)


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, help="YAML file; flags override its values")
    for flag, key, kind, text in _FLAGS:
        parser.add_argument(
            flag,
            dest=key,
            type=kind,
            default=argparse.SUPPRESS,
            help=text,
            metavar=flag.removeprefix("--").upper().replace("-", "_"),
            choices=[p.value for p in PrefillFailurePolicy]
            if key == "on_prefill_failure"
            else None,
        )
    parser.add_argument(
        "--layer-wise",
        dest="layer_wise",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="decode: ask for layer-wise KV sends",
    )
    parser.add_argument(
        "--prefix-caching",
        dest="engine.enable_prefix_caching",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="reuse cached prompt prefixes",
    )
    return parser


def parse_config(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    role: WorkerRole,
    allowed_roles: Sequence[WorkerRole] = (),
) -> WorkerConfig:
    """Parse a worker's command line (:func:`build_parser`, plus any flags the entry point
    added) into its config; a bad flag or YAML value exits with the parser's usage error."""
    args = parser.parse_args(argv)
    try:
        return config_from_args(args, role, allowed_roles)
    except ValueError as exc:
        parser.error(str(exc))


def config_from_args(
    args: argparse.Namespace, role: WorkerRole, allowed_roles: Sequence[WorkerRole] = ()
) -> WorkerConfig:
    """YAML (if ``--config``) overlaid with the flags that were given.

    ``role`` is the entry point's default role; the YAML file or a flag may pick another
    one of ``allowed_roles`` (the decode entry point also runs colocated workers).
    """
    values = vars(args).copy()
    path = values.pop("config", None)
    data = _merge(load_yaml(path) if path is not None else {}, _nest(values))
    data.setdefault("role", role.value)
    if WorkerRole(data["role"]) not in (role, *allowed_roles):
        raise ValueError(f"this entry point runs {role.value} workers, not {data['role']}")
    data.setdefault("redis_url", env.redis_url())
    return WorkerConfig.from_mapping(data)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _reject_unknown(data: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid: {sorted(known)}")
