"""A cost profile: what one replica's steps, transfers and decisions cost on some hardware.

Written by ``pdserve profile`` (measured, capacity/measure.py) or by hand from published
figures (capacity/profiles/*.json, with ``sources``). The simulator reads it through
:class:`capacity.cost_model.CostModel`. Torch-free. The JSON format (``version`` 1) is
documented in capacity/profiles/README.md; :meth:`Profile.load` checks every field and
names the first bad one.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILE_VERSION = 1


class ProfileError(ValueError):
    """A profile file or value that does not satisfy the format."""


def _check_axis(name: str, axis: tuple[int, ...], minimum: int) -> None:
    if not axis:
        raise ProfileError(f"{name}: needs at least one grid point")
    if any(not isinstance(v, int) or isinstance(v, bool) for v in axis):
        raise ProfileError(f"{name}: grid points must be integers, got {list(axis)}")
    if axis[0] < minimum:
        raise ProfileError(f"{name}: grid points must be >= {minimum}, got {axis[0]}")
    if any(b <= a for a, b in itertools.pairwise(axis)):
        raise ProfileError(f"{name}: grid points must be strictly increasing, got {list(axis)}")


def _check_seconds(name: str, value: Any) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ProfileError(f"{name}: must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ProfileError(f"{name}: must be finite and >= 0, got {value!r}")


@dataclass(frozen=True)
class Grid2D:
    """Seconds on a rectangular grid: ``seconds[i][j]`` is the cost at ``(xs[i], ys[j])``.

    ``x_name``/``y_name`` are the JSON keys of the axes (e.g. ``new_tokens`` and
    ``cached_tokens``); the cost model interpolates bilinearly between the points.
    """

    x_name: str
    y_name: str
    xs: tuple[int, ...]
    ys: tuple[int, ...]
    seconds: tuple[tuple[float, ...], ...]
    x_min: int = 1  # smallest legal x grid point
    y_min: int = 0

    def __post_init__(self) -> None:
        where = f"{self.x_name} x {self.y_name}"
        _check_axis(f"{where}: {self.x_name}", self.xs, self.x_min)
        _check_axis(f"{where}: {self.y_name}", self.ys, self.y_min)
        if len(self.seconds) != len(self.xs):
            raise ProfileError(
                f"{where}: seconds needs {len(self.xs)} rows (one per {self.x_name}), "
                f"got {len(self.seconds)}"
            )
        for i, row in enumerate(self.seconds):
            if len(row) != len(self.ys):
                raise ProfileError(
                    f"{where}: seconds row {i} needs {len(self.ys)} values "
                    f"(one per {self.y_name}), got {len(row)}"
                )
            for j, value in enumerate(row):
                _check_seconds(f"{where}: seconds[{i}][{j}]", value)

    def to_json(self) -> dict[str, Any]:
        return {
            self.x_name: list(self.xs),
            self.y_name: list(self.ys),
            "seconds": [list(row) for row in self.seconds],
        }

    @classmethod
    def from_json(cls, data: Any, x_name: str, y_name: str, x_min: int = 1) -> Grid2D:
        if not isinstance(data, dict):
            raise ProfileError(f"{x_name} x {y_name}: must be an object")
        for key in (x_name, y_name, "seconds"):
            if not isinstance(data.get(key), list):
                raise ProfileError(f"{x_name} x {y_name}: missing list {key!r}")
        rows = data["seconds"]
        if any(not isinstance(row, list) for row in rows):
            raise ProfileError(f"{x_name} x {y_name}: seconds must be a list of rows")
        return cls(
            x_name=x_name,
            y_name=y_name,
            xs=tuple(data[x_name]),
            ys=tuple(data[y_name]),
            seconds=tuple(tuple(row) for row in rows),
            x_min=x_min,
        )


@dataclass(frozen=True)
class TransferFit:
    """KV transfer time: ``latency_s + bytes / bandwidth_bytes_per_s``, fitted to
    ``points`` (``(bytes, seconds)`` as measured; empty for hand-written profiles)."""

    latency_s: float
    bandwidth_bytes_per_s: float
    points: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        _check_seconds("transfer: latency_s", self.latency_s)
        bandwidth = self.bandwidth_bytes_per_s
        if not isinstance(bandwidth, int | float) or not math.isfinite(bandwidth) or bandwidth <= 0:
            raise ProfileError(f"transfer: bandwidth_bytes_per_s must be > 0, got {bandwidth!r}")
        for k, point in enumerate(self.points):
            if len(point) != 2 or not isinstance(point[0], int) or point[0] < 0:
                raise ProfileError(f"transfer: points[{k}] must be [bytes >= 0, seconds]")
            _check_seconds(f"transfer: points[{k}] seconds", point[1])

    def to_json(self) -> dict[str, Any]:
        return {
            "latency_s": self.latency_s,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "points": [list(p) for p in self.points],
        }

    @classmethod
    def from_json(cls, data: Any) -> TransferFit:
        if not isinstance(data, dict):
            raise ProfileError("transfer: must be an object")
        for key in ("latency_s", "bandwidth_bytes_per_s"):
            if key not in data:
                raise ProfileError(f"transfer: missing {key!r}")
        points = data.get("points", [])
        if not isinstance(points, list) or any(not isinstance(p, list) for p in points):
            raise ProfileError("transfer: points must be a list of [bytes, seconds]")
        return cls(
            latency_s=data["latency_s"],
            bandwidth_bytes_per_s=data["bandwidth_bytes_per_s"],
            points=tuple(tuple(p) for p in points),  # type: ignore[misc]
        )


def fit_transfer(points: list[tuple[int, float]]) -> TransferFit:
    """Least-squares ``seconds = latency + bytes / bandwidth`` over measured points
    (latency clamped at >= 0; at least two distinct sizes needed)."""
    if len({b for b, _ in points}) < 2:
        raise ProfileError("transfer fit needs at least two distinct sizes")
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_s = sum(s for _, s in points) / n
    var = sum((b - mean_b) ** 2 for b, _ in points)
    slope = sum((b - mean_b) * (s - mean_s) for b, s in points) / var
    if slope <= 0:  # noise swamped the size term: fall back to the largest point's rate
        big_b, big_s = max(points)
        slope = big_s / max(big_b, 1)
    latency = max(mean_s - slope * mean_b, 0.0)
    return TransferFit(latency, 1.0 / slope, tuple(points))


@dataclass(frozen=True)
class Profile:
    """One replica's costs on named hardware, for one model, dtype and engine options."""

    hardware: str  # "cpu: <model name>, 1 thread" / "NVIDIA H100 SXM 80GB"
    model: str
    dtype: str
    engine: dict[str, Any]  # engine options measured with (block_size, max_num_seqs, ...)
    kv_bytes_per_token: int
    num_kv_blocks: int  # per replica, for sizing
    block_size: int
    prefill: Grid2D  # (new_tokens, cached_tokens) -> s per prefill step
    decode: Grid2D  # (batch_size, total_context) -> s per decode step
    transfer: TransferFit
    router_decision_s: float  # median
    router_decision_p99_s: float = 0.0
    overheads: dict[str, float] = field(default_factory=dict)  # seconds (one factor: e2e)
    created: str = ""  # ISO date, or "hand-written <date>"
    sources: tuple[str, ...] = ()  # where hand-written numbers come from
    notes: str = ""

    def __post_init__(self) -> None:
        for name in ("hardware", "model", "dtype"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ProfileError(f"{name}: must be a non-empty string")
        if not isinstance(self.engine, dict):
            raise ProfileError("engine: must be an object of engine options")
        for name in ("kv_bytes_per_token", "num_kv_blocks", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ProfileError(f"{name}: must be an integer >= 1, got {value!r}")
        if self.prefill.x_name != "new_tokens" or self.decode.x_name != "batch_size":
            raise ProfileError("prefill/decode grids have the wrong axes")
        _check_seconds("router_decision_s", self.router_decision_s)
        _check_seconds("router_decision_p99_s", self.router_decision_p99_s)
        if not isinstance(self.overheads, dict):
            raise ProfileError("overheads: must be an object of name -> seconds")
        for name, value in self.overheads.items():
            _check_seconds(f"overheads.{name}", value)
        if any(not isinstance(s, str) for s in self.sources):
            raise ProfileError("sources: must be a list of strings")

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens of KV one replica holds."""
        return self.num_kv_blocks * self.block_size

    def to_json(self) -> dict[str, Any]:
        """The JSON object :meth:`save` writes (``version`` first)."""
        return {
            "version": PROFILE_VERSION,
            "hardware": self.hardware,
            "model": self.model,
            "dtype": self.dtype,
            "engine": self.engine,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "num_kv_blocks": self.num_kv_blocks,
            "block_size": self.block_size,
            "created": self.created,
            "sources": list(self.sources),
            "notes": self.notes,
            "prefill": self.prefill.to_json(),
            "decode": self.decode.to_json(),
            "transfer": self.transfer.to_json(),
            "router_decision_s": self.router_decision_s,
            "router_decision_p99_s": self.router_decision_p99_s,
            "overheads": self.overheads,
        }

    @classmethod
    def from_json(cls, data: Any) -> Profile:
        """Build and validate a profile from its JSON object."""
        if not isinstance(data, dict):
            raise ProfileError("a profile must be a JSON object")
        if data.get("version") != PROFILE_VERSION:
            raise ProfileError(
                f"version: this pdserve reads profile version {PROFILE_VERSION}, "
                f"got {data.get('version')!r}"
            )
        required = (
            "hardware",
            "model",
            "dtype",
            "engine",
            "kv_bytes_per_token",
            "num_kv_blocks",
            "block_size",
            "prefill",
            "decode",
            "transfer",
            "router_decision_s",
        )
        missing = [key for key in required if key not in data]
        if missing:
            raise ProfileError(f"missing field(s): {', '.join(missing)}")
        sources = data.get("sources", [])
        if not isinstance(sources, list):
            raise ProfileError("sources: must be a list of strings")
        return cls(
            hardware=data["hardware"],
            model=data["model"],
            dtype=data["dtype"],
            engine=data["engine"],
            kv_bytes_per_token=data["kv_bytes_per_token"],
            num_kv_blocks=data["num_kv_blocks"],
            block_size=data["block_size"],
            prefill=Grid2D.from_json(data["prefill"], "new_tokens", "cached_tokens"),
            decode=Grid2D.from_json(data["decode"], "batch_size", "total_context"),
            transfer=TransferFit.from_json(data["transfer"]),
            router_decision_s=data["router_decision_s"],
            router_decision_p99_s=data.get("router_decision_p99_s", 0.0),
            overheads=data.get("overheads", {}),
            created=data.get("created", ""),
            sources=tuple(sources),
            notes=data.get("notes", ""),
        )

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read and validate a profile file; errors name the file and the field."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ProfileError(f"{path}: cannot read profile: {exc}") from exc
        try:
            return cls.from_json(data)
        except ProfileError as exc:
            raise ProfileError(f"{path}: {exc}") from exc

    def save(self, path: str | Path) -> None:
        """Write the profile as indented JSON (parent directories created)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_json(), indent=1) + "\n")
