"""`pdserve plan` end to end: the real CLI process, the real simulator, a small profile.

The profile is a CPU-sized one written here (steps of tens of ms), the traffic a few
hundred requests: the plan must finish in seconds, choose a configuration that the
simulator says meets the SLO, and write a Serve YAML that ``pdserve check`` accepts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from capacity.profile import Grid2D, Profile, TransferFit
from deploy.serve_config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
TRAFFIC = {
    "duration_s": 60,
    "rate": [[0, 10.0], [30, 30.0]],  # a step up halfway: the autoscaled variants get tried
    "input_tokens": {"dist": "uniform", "low": 64, "high": 256},
    "output_tokens": {"dist": "uniform", "low": 8, "high": 24},
    "prefix": {"groups": 2, "shared_tokens": 32, "fraction": 0.5},
    "seed": 3,
}


def small_profile() -> Profile:
    return Profile(
        hardware="cpu: test machine, 1 thread",
        model="SmolLM2-135M-Instruct",
        dtype="bfloat16",
        engine={"block_size": 16, "max_num_batched_tokens": 1024, "max_num_seqs": 64},
        kv_bytes_per_token=23040,
        num_kv_blocks=1024,
        block_size=16,
        prefill=Grid2D(
            "new_tokens",
            "cached_tokens",
            (16, 256, 1024),
            (0, 1024),
            ((0.02, 0.03), (0.08, 0.1), (0.3, 0.36)),
        ),
        decode=Grid2D(
            "batch_size",
            "total_context",
            (1, 8, 64),
            (0, 4096, 65536),
            ((0.02, 0.025, 0.06), (0.03, 0.035, 0.07), (0.08, 0.09, 0.2)),
        ),
        transfer=TransferFit(0.001, 2.5e9),
        router_decision_s=1e-4,
    )


def _plan(tmp_path: Path, *flags: str, traffic: str = "") -> subprocess.CompletedProcess[str]:
    small_profile().save(tmp_path / "profile.json")
    (tmp_path / "traffic.yaml").write_text(traffic or yaml.safe_dump(TRAFFIC))
    command = [
        sys.executable,
        "-m",
        "deploy.cli",
        "plan",
        "--traffic",
        str(tmp_path / "traffic.yaml"),
    ]
    command += ["--profile", str(tmp_path / "profile.json"), "--out", str(tmp_path / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [*command, *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_plan_writes_a_checked_yaml_and_curves(tmp_path: Path) -> None:
    flags = ["--slo-ttft-ms", "1500", "--slo-itl-ms", "100", "--max-gpus", "6"]
    done = _plan(tmp_path, *flags, "--multipliers", "0.5,1,2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[plan] " in done.stderr and "evaluated" in done.stderr
    data = json.loads((tmp_path / "out/plan.json").read_text())
    chosen = data["configurations"][0]
    assert data["simulated"] and chosen["label"] == data["chosen"]["label"]
    assert chosen["slo_attainment"] >= 0.9 and chosen["gpus"] <= 6
    curve = data["curves"][chosen["label"]]
    assert [p["multiplier"] for p in curve] == [0.5, 1.0, 2.0]
    assert curve[0]["slo_attainment"] >= curve[-1]["slo_attainment"]
    config = ServeConfig.load(tmp_path / "out/serve.yaml")
    workers = config.args.workers
    if chosen["layout"] == "disagg":
        assert [w.value for w in workers] == ["prefill", "decode"]
        entry = config.deployment("PrefillWorker")
        count = entry.get("num_replicas") or entry["autoscaling_config"]["max_replicas"]
        assert count == chosen["prefill"]
    assert chosen["label"] in done.stdout and "curve of" in done.stdout


def test_infeasible_slo_exits_1_with_a_reason(tmp_path: Path) -> None:
    done = _plan(tmp_path, "--slo-ttft-ms", "1", "--slo-itl-ms", "1", "--max-gpus", "2")
    assert done.returncode == 1
    assert "no configuration within 2 GPUs meets the SLO" in done.stderr
    assert not (tmp_path / "out/serve.yaml").exists()


def test_bad_traffic_is_a_clear_error(tmp_path: Path) -> None:
    bad = "duration_s: 10\nrate: 1\n"
    done = _plan(tmp_path, "--slo-ttft-ms", "100", "--slo-itl-ms", "10", traffic=bad)
    assert done.returncode == 2 and "missing keys" in done.stderr
