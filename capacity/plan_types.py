"""What the planner searches over and what it learns about each point: plain dataclasses.

A :class:`Candidate` is one deployment: disaggregated (``prefill`` + ``decode`` replicas)
or colocated (``prefill`` = number of colocated workers, ``decode`` = 0), each pool at a
fixed count or autoscaled (:class:`Autoscale`). An :class:`Outcome` is what one simulation
of it said against the :class:`Slo`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DISAGG = "disagg"
COLOCATED = "colocated"


@dataclass(frozen=True)
class Slo:
    """A request meets the SLO when it completes with TTFT and TPOT under the thresholds."""

    ttft_s: float
    tpot_s: float
    attainment: float = 0.9  # fraction of requests that must meet it

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0 or not 0 < self.attainment <= 1:
            raise ValueError("SLO: need ttft > 0, tpot > 0 and 0 < attainment <= 1")

    def scaled(self, factor: float) -> Slo:
        return Slo(self.ttft_s * factor, self.tpot_s * factor, self.attainment)


@dataclass(frozen=True)
class Autoscale:
    """One pool's autoscaling: bounds plus the policy targets (deploy/scaling.py)."""

    min_replicas: int
    max_replicas: int
    targets: tuple[tuple[str, float], ...]  # policy_kwargs, e.g. (("ttft_p90_ms", 500),)

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("autoscale: need 1 <= min_replicas <= max_replicas")


@dataclass(frozen=True)
class Candidate:
    layout: str  # DISAGG or COLOCATED
    prefill: int  # prefill replicas (colocated: worker replicas); the max when autoscaled
    decode: int = 0  # decode replicas (0 when colocated)
    prefill_scaling: Autoscale | None = None
    decode_scaling: Autoscale | None = None

    def __post_init__(self) -> None:
        if self.layout not in (DISAGG, COLOCATED):
            raise ValueError(f"layout must be {DISAGG} or {COLOCATED}")
        if self.prefill < 1 or (self.layout == DISAGG) != (self.decode >= 1):
            raise ValueError("disagg needs prefill, decode >= 1; colocated needs decode == 0")

    @property
    def gpus(self) -> int:
        """Replicas (one GPU each) at the peak."""
        return self.prefill + self.decode

    def label(self) -> str:
        scaled = " autoscaled" if self.prefill_scaling or self.decode_scaling else ""
        if self.layout == COLOCATED:
            return f"{self.prefill} colocated{scaled}"
        return f"{self.prefill}P+{self.decode}D{scaled}"


@dataclass(frozen=True)
class Guess:
    """Where the search starts: replica counts an analytic estimate expects to suffice."""

    prefill: int = 1
    decode: int = 1
    colocated: int = 1


@dataclass(frozen=True)
class Outcome:
    """One simulation of a candidate."""

    candidate: Candidate
    attainment: float  # fraction of all requests meeting the SLO
    goodput_rps: float  # SLO-meeting requests per simulated second
    gpu_hours: float  # replica-hours over the run (the timeline's integral)
    ttft_p90_s: float | None
    tpot_p90_s: float | None
    requests: int
    ttft_attainment: float | None = None  # share meeting the TTFT part alone (None: unknown)
    tpot_attainment: float | None = None  # share meeting the TPOT part alone
    events: int = 0
    wall_s: float = 0.0
    timeline: tuple[tuple[float, int], ...] = field(default=(), compare=False)  # (t, GPUs)
    # The simulation stopped here, once it could no longer meet the SLO's attainment
    # (capacity/plan_eval.py); its figures are then partial (attainment a lower bound).
    stopped_s: float | None = field(default=None, compare=False)

    def meets(self, slo: Slo) -> bool:
        return self.attainment >= slo.attainment
