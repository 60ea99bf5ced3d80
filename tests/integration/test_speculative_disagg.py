"""A decode worker started with speculative_method=ngram serves requests prefilled by a
real prefill worker (real processes, Redis, gRPC, KV transfer) with the same greedy tokens
as a plain in-process engine, and exports its speculative counters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration.workers_cluster import reference_llm
from tests.integration.workers_harness import (
    SMALL_ENGINE,
    decode,
    decode_request,
    greedy,
    metric,
    start_workers,
    wait_idle,
)

TEXTS = [
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef",
    "Copy this list: apples, pears, plums, apples, pears, plums, apples,",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def workers(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list]:
    common = ["--redis-url", redis_url, "--namespace", "spec-disagg", *SMALL_ENGINE]
    spec = ["--speculative-method", "ngram", "--num-speculative-tokens", "4"]
    log_dir: Path = tmp_path_factory.mktemp("spec-workers")
    procs = start_workers(
        [("prefill_worker", "prefill-s", common), ("decode_worker", "decode-s", common + spec)],
        log_dir,
    )
    yield procs
    for proc in procs:
        proc.kill()


def test_disaggregated_greedy_parity_with_ngram_speculation(workers: list) -> None:
    from engine import SamplingParams

    prefill, decoder = workers
    llm = reference_llm()
    prompts = [llm.engine.encode(text) for text in TEXTS]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    want = [out.token_ids for out in llm.generate(prompts, params)]
    with grpc.insecure_channel(decoder.grpc_address) as channel:
        for i, prompt in enumerate(prompts):
            request = decode_request(f"s{i}", prompt, greedy(MAX_TOKENS, True), prefill)
            result = decode(channel, request)
            assert result.prefilled_by == prefill.worker_id
            assert result.tokens == want[i]
        assert wait_idle(channel).used_blocks == 0
    assert metric(decoder, "pdserve_speculative_draft_tokens") > 0
    assert metric(decoder, "pdserve_speculative_accepted_tokens") > 0
