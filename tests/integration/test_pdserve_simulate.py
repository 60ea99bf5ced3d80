"""`pdserve simulate` end to end: a real process, real files, the bench-run results schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from loadgen.driver import LoadSpec, RunRecords
from loadgen.experiment import RunSpec, assemble
from loadgen.workload import WorkloadSpec
from tests.unit.sim_helpers import profile

ROOT = Path(__file__).resolve().parents[2]


class _NoTokenizer:
    def apply_chat_template(self, messages: object) -> list[int]:
        raise AssertionError("no prompts were sent")


def _bench_run_schema() -> dict:
    """The keys a real `pdserve bench run` writes for one run (loadgen.experiment.assemble)."""
    spec = RunSpec("real", WorkloadSpec(kind="fixed"), LoadSpec())
    return assemble("grpc://127.0.0.1:1", spec, RunRecords(duration_s=1.0), _NoTokenizer())


def _simulate(tmp_path: Path, *flags: str) -> dict:
    profile_path = tmp_path / "profile.json"
    profile().save(profile_path)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy.cli",
            "simulate",
            "--config",
            str(ROOT / "deploy/serve.yaml"),
            "--profile",
            str(profile_path),
            "--out",
            str(out),
            *flags,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "events/s" in done.stderr
    assert (out / "report.md").exists() and (out / "ttft_cdf.png").exists()
    return json.loads((out / "results.json").read_text())


def _check_schema(results: dict) -> dict:
    (run,) = results["runs"]
    real = _bench_run_schema()
    assert set(real) <= set(run)
    assert set(real["summary"]) <= set(run["summary"])
    assert run["simulated"] is True and results["environment"]["simulated"] is True
    assert run["profile"] == "synthetic test hardware / test-model / float32"
    if run["records"]:
        record_keys = set(run["records"][0])
        assert {"ttft_s", "itls_s", "tpot_s", "route", "cached_tokens"} <= record_keys
    return run


def test_simulate_a_trace_writes_bench_run_results(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    rows = [
        {
            "arrival_s": 0.2 * i,
            "input_tokens": 300 + 40 * i,
            "output_tokens": 12,
            "prefix_group": f"g{i % 2}",
            "prefix_tokens": 256,
        }
        for i in range(10)
    ]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = _check_schema(_simulate(tmp_path, "--trace", str(trace), "--rate", "1"))
    summary = run["summary"]
    assert summary["completed"] == 10 and summary["failed"] == 0
    assert summary["ttft_ms"]["p50"] > 0 and summary["itl_ms"]["n"] == 10 * 11
    assert summary["hit_ratio"] > 0  # shared prefixes were reused
    assert run["workload"]["kind"] == "trace"


def test_simulate_a_loadgen_workload_closed_loop(tmp_path: Path) -> None:
    run = _check_schema(
        _simulate(
            tmp_path,
            "--workload",
            "shared_prefix",
            "--groups",
            "2",
            "--prompts-per-group",
            "3",
            "--concurrency",
            "2",
            "--seed",
            "1",
        )
    )
    summary = run["summary"]
    assert summary["requests"] == 6 and summary["completed"] == 6
    assert run["load"]["mode"] == "closed" and run["workload"]["kind"] == "shared_prefix"
    assert summary["hit_ratio"] > 0.5  # each group's 512-token system prompt is shared
