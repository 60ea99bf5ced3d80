"""`pdserve profile --quick --e2e`: the real engine, a real KV transfer pair, a real gRPC
server, and probe requests through real 1P+1D and colocated stacks (redis-server, workers,
router); then the drift check, a real 1P+1D run against its simulation with that profile.

The profile is measured once (~90-120 s on the 2-core VM): the written profile loads,
names this machine, and its raw measurements are positive and ordered the way the work is
(more tokens, a bigger batch or more bytes cost more). The points compared are far apart
(16 vs 512 prompt tokens, batch 1 vs 32, 1 vs 128 blocks) so a busy machine does not flip
them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from capacity.cost_model import CostModel
from capacity.profile import Profile

PDSERVE = Path(sys.executable).with_name("pdserve")


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One `pdserve profile --quick --e2e` run on this machine: (profile file, stderr)."""
    out = tmp_path_factory.mktemp("profile") / "profile.json"
    done = subprocess.run(
        [str(PDSERVE), "profile", "--quick", "--e2e", "--threads", "1", "--out", str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stderr


def test_pdserve_profile_quick(measured: tuple[Path, str]) -> None:
    out, stderr = measured
    assert "[profile] prefill cached=0" in stderr  # progress on stderr
    profile = Profile.load(out)
    assert profile.hardware.startswith("cpu: ") and "1 thread" in profile.hardware
    assert profile.model == "SmolLM2-135M-Instruct"
    assert profile.dtype in ("float32", "bfloat16")
    assert profile.engine["block_size"] == 16 and profile.engine["num_threads"] == 1
    itemsize = 4 if profile.dtype == "float32" else 2
    assert profile.kv_bytes_per_token == 2 * 30 * 3 * 64 * itemsize
    assert profile.num_kv_blocks > 0 and profile.block_size == 16

    prefill, decode = profile.prefill, profile.decode
    assert prefill.ys[0] == 0 and prefill.ys[-1] > 0  # a real prefix-cache-hit column
    for grid in (prefill, decode):
        assert all(s > 0 for row in grid.seconds for s in row)
    assert prefill.seconds[-1][0] > prefill.seconds[0][0]  # 512 vs 16 new tokens
    assert decode.seconds[-1][0] > decode.seconds[0][0]  # batch 32 vs 1
    points = profile.transfer.points
    assert len(points) == 3 and points[-1][0] > points[0][0]
    assert points[-1][1] > points[0][1]  # 128 blocks take longer than 1
    assert profile.transfer.bandwidth_bytes_per_s > 1e7  # > 10 MB/s even on a busy box
    assert 0 < profile.router_decision_s <= profile.router_decision_p99_s < 0.05
    assert 0 < profile.overheads["rpc_s"] < 0.05
    overheads = profile.overheads  # --e2e: measured through the real stack
    assert overheads["e2e_ttft_s"] > 0 and overheads["e2e_itl_s"] > 0
    from capacity.measure_e2e import E2E_KEYS

    assert set(E2E_KEYS) <= set(overheads)  # both stacks' fits and the decode gaps
    assert all(overheads[key] >= 0 for key in E2E_KEYS)
    assert overheads["prefill_step_overhead_s"] < overheads["e2e_ttft_s"]

    cost = CostModel(profile)  # what the simulator reads
    assert cost.prefill_s(512, 0) > cost.prefill_s(16, 0) > 0
    assert cost.kv_bytes(10) == 10 * profile.kv_bytes_per_token


# The drift check: one small configuration, real vs simulated, same workload and seed.
DRIFT_WORKLOAD = [
    "--workload", "shared_prefix", "--groups", "2", "--prompts-per-group", "5",
    "--prefix-tokens", "256", "--question-tokens", "32", "--output-tokens", "8",
    "--rate", "0.4", "--seed", "0", "--slo-ttft-ms", "2000", "--slo-tpot-ms", "200",
]  # fmt: skip
DRIFT_METRICS = (("ttft_ms", "p50"), ("tpot_ms", "p50"), ("goodput_req_s",))
DRIFT_TOLERANCE = 0.25


def _summary(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["runs"][0]["summary"]


def _metric(summary: dict, path: tuple[str, ...]) -> float:
    value = summary
    for key in path:
        value = value[key]
    return float(value)


def test_the_simulator_tracks_a_real_1p1d_run_within_25_percent(
    measured: tuple[Path, str], tmp_path: Path
) -> None:
    """`pdserve bench run` against a real 1P+1D stack (redis-server, workers, router) and
    `pdserve simulate` of the same layout, workload and seed with the profile just measured
    here: TTFT p50, TPOT p50 and goodput agree within 25%, so a change that breaks the
    simulator's model of the stack (or the stack's costs) is caught. Ten requests at a rate
    where they seldom overlap: tails over ten requests are one request, so p99 is left to
    `make bench-capacity`."""
    from capacity.plan_types import DISAGG, Candidate
    from capacity.serve_yaml import candidate_config, write_config
    from loadgen.stack import OurStack, disaggregated
    from loadgen.suite import warm_up
    from router.tokenizer import ModelTokenizer

    profile, _ = measured
    real, sim = tmp_path / "real", tmp_path / "sim"
    with OurStack(disaggregated(), tmp_path / "logs") as stack:
        warm_up(stack.url, ModelTokenizer.load(None))
        command = [str(PDSERVE), "bench", "run", "--target", stack.url, *DRIFT_WORKLOAD]
        done = subprocess.run(
            [*command, "--out", str(real)], env=_env(), capture_output=True, text=True, timeout=300
        )
    assert done.returncode == 0, done.stderr[-3000:]
    root = Path(__file__).resolve().parents[2]
    config = candidate_config(Candidate(DISAGG, 1, 1), root / "deploy" / "serve.yaml")
    serve = write_config(config, tmp_path / "serve.yaml", "drift test: 1P+1D")
    command = [str(PDSERVE), "simulate", "--config", str(serve), "--profile", str(profile)]
    done = subprocess.run(
        [*command, *DRIFT_WORKLOAD, "--out", str(sim)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    measured_run, simulated = _summary(real), _summary(sim)
    assert measured_run["completed"] == simulated["completed"] == 10
    errors = {}
    for path in DRIFT_METRICS:
        r, s = _metric(measured_run, path), _metric(simulated, path)
        errors[".".join(path)] = (r, s, (s - r) / r)
    assert all(abs(e) <= DRIFT_TOLERANCE for _, _, e in errors.values()), errors
