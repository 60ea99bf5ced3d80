"""A traffic description (YAML/JSON) and the deterministic request list it stands for.

The file says *how much* traffic arrives over time and *what shape* each request has; the
planner turns it into :class:`capacity.sim.SimRequest` objects with one seeded generator,
so the same file and seed always give the same requests::

    duration_s: 3600          # simulated time covered
    seed: 0
    block_size: 16            # tokens per KV block (the profile's, for block hashes)
    rate: 20                  # requests/s; or one of:
    # rate: [[0, 5], [600, 20], [1800, 10]]        # piecewise constant: (t, rate) steps
    # rate: {diurnal: {mean: 10, amplitude: 0.5, period_s: 86400, phase_s: 0}}
    input_tokens:  {dist: lognormal, mean: 1000, sd: 400, min: 16, max: 8192}
    output_tokens: {dist: uniform, low: 64, high: 256}
    # also {dist: fixed, value: 128} and {dist: empirical, values: [120, 480, 2000]}
    prefix:                   # optional prefix sharing (system prompts, few-shot headers)
      groups: 8               # distinct shared prefixes
      shared_tokens: 512      # length of each
      fraction: 0.6           # share of requests that start with one (uniform over groups)
    suffix_hashes: true       # false: hash only the shared prefix's blocks (see below)

Arrivals are a Poisson process whose rate follows ``rate`` (thinning against its peak).
``input_tokens`` is the whole prompt; a prompt that starts with a shared prefix is at least
one token longer than it. Block hashes follow :mod:`common.hashing`'s chain semantics: the
blocks of a group's prefix are hashed with :func:`common.hashing.hash_block` over synthetic
token ids (so equal hashes mean equal prefixes), and the later blocks of a request get
consecutive 64-bit values from a random 48-bit base (``base << 16``, one draw of the seeded
generator per request): unique with overwhelming probability, which is what a chain over a
never-seen-before suffix gives, at a fraction of the cost (a fleet-hour of 6k-token prompts
is ~2·10^9 blocks). ``suffix_hashes: false`` leaves those unique blocks unhashed: they can
never hit, the simulator sizes KV from ``prompt_tokens``, and an unhashed block is freed
rather than kept as an evictable cached block, so the only difference is that unique
blocks no longer compete with shared prefixes for cache space (for fleet-sized plans,
where the hashes dominate the cost of generating and simulating the requests).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from common.hashing import ROOT_HASH, hash_block

_DISTS = ("fixed", "uniform", "lognormal", "empirical")


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution, clamped to [min, max]."""

    dist: str
    value: int = 0  # fixed
    low: int = 0  # uniform
    high: int = 0
    mean: float = 0.0  # lognormal
    sd: float = 0.0
    values: tuple[int, ...] = ()  # empirical: sampled uniformly
    min: int = 1
    max: int = 1 << 20

    def __post_init__(self) -> None:
        if self.dist not in _DISTS:
            raise ValueError(f"dist must be one of {_DISTS}, got {self.dist!r}")
        if self.dist == "fixed" and self.value < 1:
            raise ValueError("fixed: value must be >= 1")
        if self.dist == "uniform" and not 1 <= self.low <= self.high:
            raise ValueError("uniform: need 1 <= low <= high")
        if self.dist == "lognormal" and (self.mean <= 0 or self.sd < 0):
            raise ValueError("lognormal: need mean > 0 and sd >= 0")
        if self.dist == "empirical" and (not self.values or min(self.values) < 1):
            raise ValueError("empirical: values must be a non-empty list of lengths >= 1")
        if not 1 <= self.min <= self.max:
            raise ValueError("need 1 <= min <= max")

    @classmethod
    def parse(cls, data: Any, where: str) -> LengthDist:
        if isinstance(data, int):
            return cls("fixed", value=data)
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping with 'dist' or an integer")
        fields = dict(data)
        if "values" in fields:
            fields["values"] = tuple(int(v) for v in fields["values"])
        try:
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None

    def sampler(self, rng: random.Random) -> Callable[[], int]:
        """A zero-argument function drawing one length from ``rng``."""
        low, high = self.min, self.max
        if self.dist == "fixed":
            fixed = max(low, min(high, self.value))
            return lambda: fixed
        if self.dist == "uniform":
            return lambda: max(low, min(high, rng.randint(self.low, self.high)))
        if self.dist == "empirical":
            values = self.values
            return lambda: max(low, min(high, rng.choice(values)))
        sigma = math.sqrt(math.log(1.0 + (self.sd / self.mean) ** 2))
        mu = math.log(self.mean) - sigma * sigma / 2.0
        return lambda: max(low, min(high, round(rng.lognormvariate(mu, sigma))))


@dataclass(frozen=True)
class RateCurve:
    """Arrival rate (requests/s) over time: piecewise constant steps or a diurnal sine."""

    steps: tuple[tuple[float, float], ...] = ()  # (t, rate) from t until the next step
    diurnal: tuple[float, float, float, float] | None = None  # mean, amplitude, period, phase
    _times: tuple[float, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_times", tuple(t for t, _ in self.steps))
        if self.diurnal is None:
            if not self.steps or any(r < 0 for _, r in self.steps):
                raise ValueError("rate: need at least one (t, rate) step with rate >= 0")
            times = [t for t, _ in self.steps]
            if times != sorted(times) or times[0] > 0:
                raise ValueError("rate: steps must be sorted by t and start at t <= 0")
        else:
            mean, amplitude, period, _ = self.diurnal
            if mean <= 0 or not 0 <= amplitude <= 1 or period <= 0:
                raise ValueError("rate: diurnal needs mean > 0, 0 <= amplitude <= 1, period > 0")

    @classmethod
    def parse(cls, data: Any) -> RateCurve:
        if isinstance(data, int | float):
            return cls(steps=((0.0, float(data)),))
        if isinstance(data, list):
            return cls(steps=tuple((float(t), float(r)) for t, r in data))
        if isinstance(data, dict) and "diurnal" in data:
            d = data["diurnal"]
            return cls(
                diurnal=(
                    float(d["mean"]),
                    float(d.get("amplitude", 0.5)),
                    float(d.get("period_s", 86400)),
                    float(d.get("phase_s", 0)),
                )
            )
        raise ValueError("rate: a number, a list of [t, rate], or {diurnal: {...}}")

    def at(self, t: float) -> float:
        if self.diurnal is not None:
            mean, amplitude, period, phase = self.diurnal
            return mean * (1.0 + amplitude * math.sin(2 * math.pi * (t - phase) / period))
        index = bisect.bisect_right(self._times, t) - 1
        return self.steps[max(index, 0)][1]

    def peak(self) -> float:
        if self.diurnal is not None:
            return self.diurnal[0] * (1.0 + self.diurnal[1])
        return max(r for _, r in self.steps)

    def scaled(self, factor: float) -> RateCurve:
        """The same shape at ``factor`` times the rate (rate sweeps, sub-fleets)."""
        if self.diurnal is not None:
            mean, amplitude, period, phase = self.diurnal
            return RateCurve(diurnal=(mean * factor, amplitude, period, phase))
        return RateCurve(steps=tuple((t, r * factor) for t, r in self.steps))


@dataclass(frozen=True)
class PrefixSharing:
    groups: int = 0
    shared_tokens: int = 0
    fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.groups < 0 or self.shared_tokens < 0 or not 0 <= self.fraction <= 1:
            raise ValueError("prefix: need groups >= 0, shared_tokens >= 0, 0 <= fraction <= 1")


@dataclass(frozen=True)
class Traffic:
    """A parsed traffic description (see the module doc for the file format)."""

    duration_s: float
    rate: RateCurve
    input_tokens: LengthDist
    output_tokens: LengthDist
    prefix: PrefixSharing = PrefixSharing()
    block_size: int = 16
    seed: int = 0
    suffix_hashes: bool = True  # hash the unique blocks after the shared prefix too

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.block_size < 1:
            raise ValueError("need duration_s > 0 and block_size >= 1")

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> Traffic:
        known = {"duration_s", "rate", "input_tokens", "output_tokens", "prefix"}
        known |= {"block_size", "seed", "suffix_hashes"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"traffic: unknown keys {unknown}")
        missing = sorted({"duration_s", "rate", "input_tokens", "output_tokens"} - set(data))
        if missing:
            raise ValueError(f"traffic: missing keys {missing}")
        return cls(
            duration_s=float(data["duration_s"]),
            rate=RateCurve.parse(data["rate"]),
            input_tokens=LengthDist.parse(data["input_tokens"], "input_tokens"),
            output_tokens=LengthDist.parse(data["output_tokens"], "output_tokens"),
            prefix=PrefixSharing(**(data.get("prefix") or {})),
            block_size=int(data.get("block_size", 16)),
            seed=int(data.get("seed", 0)),
            suffix_hashes=bool(data.get("suffix_hashes", True)),
        )

    @classmethod
    def load(cls, path: str | Path) -> Traffic:
        """Read a YAML or JSON file (JSON is YAML); ValueError names the file."""
        try:
            data = yaml.safe_load(Path(path).read_text())
            if not isinstance(data, dict):
                raise ValueError("expected a mapping at the top level")
            return cls.from_mapping(data)
        except (ValueError, TypeError, KeyError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    def scaled(self, factor: float) -> Traffic:
        """This traffic at ``factor`` times the rate."""
        return replace(self, rate=self.rate.scaled(factor))

    def mean_rate(self) -> float:
        """Average arrival rate over the duration (numerically, 1 s resolution)."""
        steps = max(1, int(self.duration_s))
        width = self.duration_s / steps
        return sum(self.rate.at((i + 0.5) * width) for i in range(steps)) / steps


def generate(traffic: Traffic, *, seed: int | None = None) -> list[Any]:
    """The requests of ``traffic``, sorted by arrival; deterministic for a given seed."""
    from capacity.sim import SimRequest

    rng = random.Random(traffic.seed if seed is None else seed)
    draw_in = traffic.input_tokens.sampler(rng)
    draw_out = traffic.output_tokens.sampler(rng)
    prefixes = _group_prefixes(traffic)
    block = traffic.block_size
    shared = traffic.prefix.shared_tokens
    peak = traffic.rate.peak()
    requests: list[Any] = []
    t = 0.0
    while peak > 0:
        t += rng.expovariate(peak)
        if t >= traffic.duration_s:
            break
        if rng.random() * peak > traffic.rate.at(t):
            continue  # thinning: keep an arrival with probability rate(t) / peak
        prompt = draw_in()
        hashes: list[int] = []
        if prefixes and rng.random() < traffic.prefix.fraction:
            hashes = list(rng.choice(prefixes))
            prompt = max(prompt, shared + 1)
        fresh = prompt // block - len(hashes) if traffic.suffix_hashes else 0
        if fresh > 0:  # consecutive values from a random 48-bit base: unique, and cheap
            base = rng.getrandbits(48) << 16
            hashes.extend(range(base, base + fresh))
        requests.append(
            SimRequest(
                request_id=f"r{len(requests)}",
                arrival_s=t,
                prompt_tokens=prompt,
                output_tokens=draw_out(),
                block_hashes=tuple(hashes),
            )
        )
    return requests


def _group_prefixes(traffic: Traffic) -> list[tuple[int, ...]]:
    """Each prefix group's block-hash chain (full blocks of the shared prefix)."""
    chains = []
    for group in range(traffic.prefix.groups):
        parent, chain = ROOT_HASH, []
        for index in range(traffic.prefix.shared_tokens // traffic.block_size):
            start = group * 7919 + index * traffic.block_size
            tokens = [(start + k) % 49152 for k in range(traffic.block_size)]
            parent = hash_block(parent, tokens)
            chain.append(parent)
        chains.append(tuple(chain))
    return chains
