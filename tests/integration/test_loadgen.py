"""The load generator against real servers: pdserve (redis + prefill + decode + router
processes on 127.0.0.1, the real model) and `transformers serve` over OpenAI HTTP."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadgen.driver import LoadSpec
from loadgen.experiment import RunSpec, run_experiment
from loadgen.stack import OurStack, TransformersServe, colocated, disaggregated
from loadgen.workload import WorkloadSpec
from router.tokenizer import ModelTokenizer

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer() -> ModelTokenizer:
    return ModelTokenizer.load(None)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OurStack]:
    with OurStack(disaggregated(num_kv_blocks=512), tmp_path_factory.mktemp("stack")) as stack:
        yield stack


def test_bench_run_cli_on_shared_prefix(stack: OurStack, tmp_path: Path) -> None:
    """`pdserve bench run` end to end: every request completes, the one prefill worker's
    cache gets every hit the workload allows (one at a time, so nothing races), and the
    JSON, Markdown and plots are written."""
    command = [
        sys.executable, "-m", "deploy.cli", "bench", "run", "--target", stack.url,
        "--workload", "shared_prefix", "--groups", "2", "--prompts-per-group", "3",
        "--prefix-tokens", "96", "--question-tokens", "16", "--output-tokens", "4",
        "--concurrency", "1", "--max-duration", "120", "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=300, env=os.environ.copy()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    summary = result["summary"]
    assert (summary["completed"], summary["failed"], summary["unsent"]) == (6, 0, 0)
    assert summary["hit_ratio"] > 0.3
    assert summary["hit_ratio"] == pytest.approx(summary["oracle_hit_ratio"], abs=1e-3)
    assert summary["ttft_ms"]["n"] == 6 and summary["itl_ms"]["n"] == 6 * 3
    assert all(r["route"].startswith("prefill-0>decode-0") for r in result["records"])
    assert all(r["output_tokens"] == 4 for r in result["records"])
    for name in ("report.md", "ttft_cdf.png", "itl_cdf.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "shared_prefix" in done.stdout and "| run |" in done.stdout


def test_bench_run_over_the_routers_http_api(stack: OurStack, tmp_path: Path) -> None:
    """The same router's OpenAI-compatible HTTP port as a `pdserve bench run` target: a
    tiny bounded run, every request completes with its tokens and the cached counts."""
    command = [
        sys.executable, "-m", "deploy.cli", "bench", "run", "--target", stack.http_url,
        "--workload", "shared_prefix", "--groups", "1", "--prompts-per-group", "3",
        "--prefix-tokens", "64", "--question-tokens", "16", "--output-tokens", "4",
        "--concurrency", "1", "--max-duration", "60", "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=180, env=os.environ.copy()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    summary = result["summary"]
    assert (summary["completed"], summary["failed"], summary["unsent"]) == (3, 0, 0)
    assert all(r["output_tokens"] == 4 for r in result["records"])
    assert summary["hit_ratio"] > 0.3  # prompt_tokens_details.cached_tokens came through


def test_multi_turn_replays_the_conversation(stack: OurStack, tokenizer: ModelTokenizer) -> None:
    workload = WorkloadSpec(kind="multi_turn", conversations=2, turns=3, turn_tokens=24,
                            output_tokens=6, seed=5)  # fmt: skip
    load = LoadSpec(mode="open", rate=4.0, max_duration_s=60, progress=False)
    result = run_experiment(stack.url, RunSpec("ours", workload, load), tokenizer)
    records = result["records"]
    assert result["summary"]["completed"] == 6
    for conversation in ("c0000", "c0001"):
        turns = sorted(
            (r for r in records if r["session"] == conversation), key=lambda r: r["turn"]
        )
        prompts = [r["prompt_tokens"] for r in turns]
        # each turn carries the previous prompt, the reply (6 tokens) and a new user turn
        assert all(b >= a + 6 + 24 for a, b in itertools.pairwise(prompts))
        assert [r["turn"] for r in turns] == [0, 1, 2]
        assert all(b["sent_s"] >= a["end_s"] for a, b in itertools.pairwise(turns))
        assert turns[-1]["cached_tokens"] > 0  # the earlier turns' prompt is on prefill-0


def test_openai_client_against_transformers_serve(
    tmp_path: Path, tokenizer: ModelTokenizer
) -> None:
    """The same client drives a peer's OpenAI-compatible server (same model, same box)."""
    workload = WorkloadSpec(kind="fixed", num_requests=2, input_tokens=32, output_tokens=5)
    load = LoadSpec(
        mode="closed", concurrency=1, max_duration_s=120, progress=False, ignore_eos=False
    )
    with TransformersServe(tmp_path) as peer:
        result = run_experiment(
            peer.url, RunSpec("peer", workload, load, model=peer.model), tokenizer
        )
    summary = result["summary"]
    assert summary["completed"] == 2, summary["errors"]
    # usage.completion_tokens: 5 each unless the model chose EOS first
    assert 2 <= summary["output_tokens"] <= 10
    assert summary["ttft_ms"]["n"] == 2 and summary["itl_ms"]["n"] >= 1
    assert summary["hit_ratio"] is None  # it does not report cached tokens
    assert all(r["prompt_tokens"] > 32 for r in result["records"])  # template + 32 tokens


def test_router_refusals_are_recorded_apart_from_failures(
    tmp_path: Path, tokenizer: ModelTokenizer
) -> None:
    """A burst past the router pool's admission bound (1 in flight, none queued) through
    the real gRPC and HTTP targets: the loadgen records RESOURCE_EXHAUSTED / 429 as
    refused, with the retry hint and a latency, never as failed; the rest complete."""
    spec = dataclasses.replace(
        colocated(1, num_kv_blocks=256), pool_options={"max_in_flight": 1, "max_queued": 0}
    )
    workload = WorkloadSpec(kind="fixed", num_requests=6, input_tokens=32, output_tokens=8)
    load = LoadSpec(mode="closed", concurrency=6, max_duration_s=60, progress=False)
    with OurStack(spec, tmp_path) as stack:
        summaries = [
            run_experiment(url, RunSpec(api, workload, load), tokenizer)["summary"]
            for api, url in (("grpc", stack.url), ("http", stack.http_url))
        ]
        for summary in summaries:
            assert summary["failed"] == 0, summary["errors"]
            assert summary["refused"] >= 1 and summary["completed"] >= 1
            assert summary["refused"] + summary["completed"] == 6
            assert summary["refusal_ms"]["n"] == summary["refused"]
            assert summary["retry_after_ms"]["n"] == summary["refused"]  # each had a hint
        used = {name: s["used_blocks"] for name, s in stack.worker_status().items()}
    assert used == {"colocated-0": 0}
