"""The parent side of one system's run: start its process, read back what it measured.

:func:`run_child` writes the spec, runs ``python -m benchmarks.engine.child`` with the
system's Python (this venv's, or the peer's for vLLM) and returns its JSON;
:func:`measurements` turns that into :class:`Measurement` rows; :func:`agreement` compares
two systems' greedy tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._common import median
from benchmarks.engine.spec import ChildSpec

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(slots=True)
class Measurement:
    system: str
    dtype: str
    workload: str
    num_requests: int
    useful_tokens: int  # output tokens the requests asked for, per repeat
    computed_tokens: int  # output tokens the system decoded, per repeat
    prompt_tokens: int
    wall_s: list[float] = field(default_factory=list)  # one per repeat
    ttft_s: list[float] = field(default_factory=list)  # batch1: 1-token runs
    cached_tokens: int = 0
    peak_rss_bytes: int = 0  # of the system's whole process (the run's peak, not this row's)
    reference: str | None = None  # the system the tokens are compared with
    exact_match_vs_ref: float | None = None  # fraction of requests equal to the reference
    prefix_match_vs_ref: float | None = None  # mean matching-prefix share of each output

    @property
    def wall(self) -> float:
        return median(self.wall_s)

    @property
    def tok_s(self) -> float:
        return self.useful_tokens / self.wall

    @property
    def ttft(self) -> float | None:
        return median(self.ttft_s) if self.ttft_s else None

    @property
    def tpot(self) -> float | None:
        """Median over rounds of (wall - TTFT) / (tokens - 1); None if noise made it <= 0.

        Batch 1 only (it has TTFT probes). Elsewhere: wall / tokens per request, i.e. the
        mean time between a request's tokens while the whole batch decodes."""
        if not self.ttft_s:
            per_request = self.useful_tokens / max(self.num_requests, 1)
            return self.wall / per_request if per_request else None
        if self.useful_tokens < 2:
            return None
        pairs = zip(self.wall_s, self.ttft_s, strict=True)
        per_round = [(wall - ttft) / (self.useful_tokens - 1) for wall, ttft in pairs]
        value = median(per_round)
        return value if value > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "wall_median_s": self.wall,
            "tok_s": self.tok_s,
            "ttft_median_s": self.ttft,
            "tpot_s": self.tpot,
        }


def run_child(
    spec: ChildSpec, python: Path, env: Mapping[str, str], timeout_s: float
) -> dict[str, Any]:
    """Run ``spec`` in a fresh process of ``python``; its JSON, or ``{"error": ...}``."""
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-engine-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write(spec_path)
        child_env = {
            **os.environ,
            **env,
            "PYTHONPATH": str(REPO_ROOT),
            "OMP_NUM_THREADS": str(spec.threads),
        }
        cmd = [str(python), "-m", "benchmarks.engine.child", str(spec_path), str(out_path)]
        try:
            proc = subprocess.run(cmd, env=child_env, cwd=REPO_ROOT, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s"}
        if not out_path.exists():
            return {"error": f"exited {proc.returncode} without results"}
        return json.loads(out_path.read_text())


def measurements(spec: ChildSpec, payload: dict[str, Any]) -> tuple[list[Measurement], dict]:
    """(one Measurement per workload, tokens by workload name) from a child's JSON."""
    by_name = {w.name: w for w in spec.workloads}
    rss = payload["peak_rss_bytes"]["self"]
    rows, tokens = [], {}
    for result in payload["results"]:
        first = by_name[result["workload"]].rounds[0]
        rows.append(
            Measurement(
                system=spec.system,
                dtype=spec.dtype,
                workload=result["workload"],
                num_requests=len(first),
                useful_tokens=sum(r.max_new_tokens for r in first),
                computed_tokens=result["computed_tokens"],
                prompt_tokens=sum(len(r.prompt) for r in first),
                wall_s=result["wall_s"],
                ttft_s=result["ttft_s"],
                cached_tokens=result["cached_tokens"],
                peak_rss_bytes=rss,
            )
        )
        tokens[result["workload"]] = result["tokens"]
    return rows, tokens


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(share of identical outputs, mean share of each output matching before divergence)."""
    exact, prefix = 0, 0.0
    for got, want in zip(outputs, reference, strict=True):
        same = next(
            (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), len(want)
        )
        exact += same == len(want)
        prefix += same / max(len(want), 1)
    return exact / len(reference), prefix / len(reference)


def this_python() -> Path:
    return Path(sys.executable)
