"""A standard external load generator, guidellm, drives the router's OpenAI HTTP API.

guidellm (a dev extra, installed from the package registry) runs as a user would run it:
its own CLI, fully offline (``HF_HUB_OFFLINE=1``; synthetic prompts sized with our model's
local tokenizer directory), a bounded run of a few streaming chat requests at concurrency 2
against ``python -m router --http-port 0`` in front of the session's real workers
(:mod:`tests.integration.workers_cluster`). Its JSON report is the evidence: every request
succeeded, with the token counts the router reported and latencies it measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.launch import child_env
from common.server_process import RouterProcess
from router.tokenizer import default_model_dir
from tests.integration.workers_cluster import NAMESPACE, Cluster, cluster_fixture  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

GUIDELLM = Path(sys.executable).with_name("guidellm")
REQUESTS, OUTPUT_TOKENS = 6, 8


@pytest.fixture(scope="module")
def router(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    log = tmp_path_factory.mktemp("guidellm-router") / "router.log"
    args = ["--redis-url", cluster.redis_url, "--namespace", NAMESPACE, "--port", "0"]
    process = RouterProcess([*args, "--http-port", "0", "--metrics-port", "0"], log)
    try:
        process.wait_ready()
        yield process
    finally:
        process.kill()


def test_guidellm_bounded_run_offline(router: RouterProcess, tmp_path: Path) -> None:
    assert GUIDELLM.is_file(), "guidellm is a dev extra: pip install -e '.[dev]'"
    report = tmp_path / "guidellm.json"
    command = [
        str(GUIDELLM), "run",
        "--backend", f"kind=openai_http,target=http://{router.http_address},model=default",
        "--tokenizer", f"kind=hf_auto,model={default_model_dir()}",
        "--data", f"kind=synthetic_text,prompt_tokens=48,output_tokens={OUTPUT_TOKENS}",
        "--profile", "kind=concurrent,streams=2",
        "--constraint", f"kind=max_requests,count={REQUESTS}",
        "--constraint", "kind=max_duration,seconds=60",
        "--output", f"kind=json,path={report}",
        "--disable-console-interactive",
    ]  # fmt: skip
    env = child_env(threads=1, extra={"HF_DATASETS_OFFLINE": "1"})
    started = time.monotonic()
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    took = time.monotonic() - started
    logs = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{router.log_tail()}"
    assert done.returncode == 0, logs
    assert took < 90, f"guidellm took {took:.0f} s\n{logs}"

    (benchmark,) = json.loads(report.read_text())["benchmarks"]
    requests = benchmark["requests"]
    # guidellm exits 0 even when every request failed: the report says what happened.
    assert len(requests["errored"]) == 0, requests["errored"][:1]
    assert len(requests["successful"]) == REQUESTS, logs
    for request in requests["successful"]:
        # ignore_eos + max_tokens (guidellm's fixed-length outputs) are honoured exactly,
        # and usage reaches it through the stream (stream_options.include_usage).
        assert request["output_metrics"]["text_tokens"] == OUTPUT_TOKENS, request
        assert request["input_metrics"]["text_tokens"] >= 40, request
        assert request["output"], request
    metrics = benchmark["metrics"]
    ttft = metrics["time_to_first_token_ms"]["successful"]
    assert ttft["count"] == REQUESTS and 0 < ttft["median"] < 30_000, ttft
    assert metrics["inter_token_latency_ms"]["successful"]["median"] > 0
