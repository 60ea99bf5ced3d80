"""What a worker tells the registry about itself: identity, block geometry and load.

These dataclasses cross process boundaries as JSON strings in Redis (see
:mod:`common.registry`). The contract:

- ``WorkerInfo`` is written once at registration and describes a worker for its whole life:
  where to reach it (gRPC data plane, KV transfer endpoint) and the shape of its KV blocks,
  which decides whether a prefill and a decode worker can exchange blocks at all.
- ``WorkerLoad`` is rewritten on every heartbeat (every ~0.25 s) and is what routers rank
  workers by. ``None`` latencies mean "no recent samples", not zero.

Parsing is strict where a wrong value would route traffic wrongly: a missing field, a value
of the wrong type, a negative count or an unknown role raises ``ValueError``. Fields this
version does not know are ignored, so a newer worker can add fields during a rolling
upgrade without making older routers drop it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from common.kv_compat import KV_DTYPES, LAYER_FIRST, KVCompat, row_bytes


class WorkerRole(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"  # prefills and decodes itself: the non-disaggregated baseline


@dataclass(frozen=True, slots=True)
class BlockGeometry(KVCompat):
    """Shape of one worker's paged KV cache: its KV compatibility plus its capacity.

    Two workers can exchange blocks iff ``a.mismatch(b) is None`` (capacity may differ):
    the same check the KV handshake makes."""

    num_blocks: int  # capacity of this worker's cache (may differ between workers)

    def __post_init__(self) -> None:
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"unknown KV dtype {self.dtype!r}; known: {sorted(KV_DTYPES)}")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {self.num_blocks}")

    @property
    def block_bytes(self) -> int:
        """Bytes of one block, K and V over all layers (quantized rows carry their scale)."""
        rows = 2 * self.num_layers * self.num_kv_heads * self.block_size
        return rows * row_bytes(self.dtype, self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> BlockGeometry:
        d = _Fields(data, cls.__name__)
        return cls(
            model=d.string("model"),
            dtype=d.string("dtype"),
            block_size=d.integer("block_size"),
            num_layers=d.integer("num_layers"),
            num_kv_heads=d.integer("num_kv_heads"),
            head_dim=d.integer("head_dim"),
            num_blocks=d.integer("num_blocks"),
            # absent from registrations of workers older than the page-first order
            order=d.string("order") if "order" in data else LAYER_FIRST,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> BlockGeometry:
        return cls.from_dict(_loads(text))


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A worker's registration: written once, lives as long as its heartbeat."""

    worker_id: str  # unique per process lifetime; a restart registers a new or cleared id
    role: WorkerRole
    pool: str  # routing pool (usually one per model deployment)
    model: str
    grpc_address: str  # "host:port" of the worker's gRPC data-plane server
    kv_address: str | None  # KV transfer rendezvous "host:port"; None if it takes no transfers
    geometry: BlockGeometry
    started_at: float = field(default_factory=time.time)  # unix seconds

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("worker_id must be non-empty")
        if not self.pool:
            raise ValueError("pool must be non-empty")
        if not isinstance(self.role, WorkerRole):
            # Accept the plain string at construction, but only a known one.
            object.__setattr__(self, "role", _role(self.role))

    def to_json(self) -> str:
        data = asdict(self)
        data["role"] = self.role.value
        return json.dumps(data, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerInfo:
        d = _Fields(_loads(text), cls.__name__)
        return cls(
            worker_id=d.string("worker_id"),
            role=_role(d.string("role")),
            pool=d.string("pool"),
            model=d.string("model"),
            grpc_address=d.string("grpc_address"),
            kv_address=d.optional_str("kv_address"),
            geometry=BlockGeometry.from_dict(d.raw("geometry")),
            started_at=d.number("started_at"),
        )


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """A worker's load snapshot, republished on every heartbeat."""

    worker_id: str
    queued: int  # requests accepted but not yet running
    running: int  # requests in the running batch
    free_blocks: int  # KV blocks neither in use nor cached
    used_blocks: int  # KV blocks held by live requests
    cached_blocks: int  # KV blocks only held by the prefix cache (reclaimable)
    ttft_ms_recent: float | None = None  # recent time to first token; None = no samples
    itl_ms_recent: float | None = None  # recent inter-token latency; None = no samples
    queued_prefill_tokens: int = 0  # prompt tokens waiting to be prefilled
    draining: bool = False  # takes no new work; finishing what it has before exiting
    updated_at: float = field(default_factory=time.time)  # unix seconds, worker's clock
    # KV receivers ("host:port", their WorkerInfo.kv_address) this worker holds a pair group
    # with: the router prefers those pairs when scores are close (no group to build).
    kv_peers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "queued",
            "running",
            "free_blocks",
            "used_blocks",
            "cached_blocks",
            "queued_prefill_tokens",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerLoad:
        d = _Fields(_loads(text), cls.__name__)
        return cls(
            worker_id=d.string("worker_id"),
            queued=d.integer("queued"),
            running=d.integer("running"),
            free_blocks=d.integer("free_blocks"),
            used_blocks=d.integer("used_blocks"),
            cached_blocks=d.integer("cached_blocks"),
            ttft_ms_recent=d.optional_float("ttft_ms_recent"),
            itl_ms_recent=d.optional_float("itl_ms_recent"),
            queued_prefill_tokens=d.integer("queued_prefill_tokens"),
            draining=d.boolean("draining"),
            updated_at=d.number("updated_at"),
            kv_peers=d.string_tuple("kv_peers"),  # absent from older workers: ()
        )


def _role(value: str) -> WorkerRole:
    try:
        return WorkerRole(value)
    except ValueError:
        known = ", ".join(r.value for r in WorkerRole)
        raise ValueError(f"unknown worker role {value!r}; expected one of {known}") from None


def _loads(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"invalid JSON: {exc}") from None


class _Fields:
    """Typed, strict access to one decoded JSON object; errors name the object and key."""

    def __init__(self, data: Any, what: str) -> None:
        if not isinstance(data, dict):
            raise ValueError(f"{what}: expected a JSON object, got {type(data).__name__}")
        self._data = data
        self._what = what

    def raw(self, key: str) -> Any:
        if key not in self._data:
            raise ValueError(f"{self._what}: missing field {key!r}")
        return self._data[key]

    def _typed(self, key: str, types: tuple[type, ...], name: str) -> Any:
        value = self.raw(key)
        # bool is an int subclass; a JSON true must not pass as a block count.
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise ValueError(f"{self._what}.{key}: expected {name}, got {value!r}")
        return value

    def string(self, key: str) -> str:
        return self._typed(key, (str,), "a string")

    def integer(self, key: str) -> int:
        return self._typed(key, (int,), "an integer")

    def number(self, key: str) -> float:
        return float(self._typed(key, (int, float), "a number"))

    def boolean(self, key: str) -> bool:
        return self._typed(key, (bool,), "a boolean")

    def string_tuple(self, key: str) -> tuple[str, ...]:
        """A list of strings; an absent key is the empty tuple."""
        value = self._data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{self._what}: field {key!r} must be a list of strings")
        return tuple(value)

    def optional_str(self, key: str) -> str | None:
        return None if self.raw(key) is None else self.string(key)

    def optional_float(self, key: str) -> float | None:
        return None if self.raw(key) is None else self.number(key)
