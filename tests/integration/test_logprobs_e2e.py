"""Log-probs through the whole cluster: router → decode worker ← prefill worker.

The session worker set (tests/integration/workers_cluster.py: two prefill workers, a
decode worker, a colocated worker; fp32) behind a real router process. In disaggregated
mode the first token, its log-prob and the prompt's log-probs come from the prefill
worker; the rest from the decode worker. All must equal the single fp32 engine's.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import grpc
import openai
import pytest

from common.server_process import RouterProcess
from engine import SamplingParams
from proto import serving_pb2, worker_pb2, worker_pb2_grpc
from router.client import build_request, run, stream_generate
from tests.integration.workers_cluster import (  # noqa: F401
    NAMESPACE,
    Cluster,
    cluster_fixture,
    reference_llm,
)
from tests.integration.workers_harness import decode_request, wait_until
from tests.perplexity import ENGLISH_TEXT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TOL = 1e-4
MAX_TOKENS = 6
TEXTS = ["The capital of France is", ENGLISH_TEXT.read_text()[:700]]  # the second: 9+ blocks


@pytest.fixture(scope="module")
def router(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    log = tmp_path_factory.mktemp("logprobs-router") / "router.log"
    args = ["--redis-url", cluster.redis_url, "--namespace", NAMESPACE, "--port", "0"]
    process = RouterProcess([*args, "--http-port", "0", "--metrics-port", "0"], log)
    try:
        process.wait_ready()
        wait_until(lambda: _generates(process.address), 30, "the router serves a request")
        yield process
    finally:
        process.kill()


def _generates(address: str) -> bool:
    try:
        list(stream_generate(address, build_request("Hi", max_tokens=1), 10))
    except grpc.RpcError:
        return False
    return True


def _grpc(address: str, **options: object) -> list[serving_pb2.GenerateResponse]:
    return list(stream_generate(address, build_request(**options), 120))  # type: ignore[arg-type]


def _close(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and all(abs(a - b) < TOL for a, b in zip(got, want, strict=True))


def test_grpc_logprobs_equal_the_single_engine(router: RouterProcess) -> None:
    llm = reference_llm()
    prompts = [llm.engine.encode(t) for t in TEXTS]
    params = SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, logprobs=3, prompt_logprobs=True
    )
    expected = llm.generate(prompts, params)
    for ids, want in zip(prompts, expected, strict=True):
        replies = _grpc(
            router.address,
            token_ids=ids,
            max_tokens=MAX_TOKENS,
            logprobs=3,
            prompt_logprobs=True,
        )
        assert replies[0].route.prefill_worker, "expected a disaggregated route"
        tokens = [t for r in replies for t in r.token_ids]
        entries = [lp for r in replies for lp in r.logprobs]
        assert tokens == want.token_ids
        assert [e.token_id for e in entries] == tokens  # one per token, the first included
        assert _close([e.logprob for e in entries], [lp.logprob for lp in want.logprobs])
        for got, ref in zip(entries, want.logprobs, strict=True):
            assert [t.token_id for t in got.top] == [t for t, _ in ref.top]
            assert _close([t.logprob for t in got.top], [v for _, v in ref.top])
        prompt = list(replies[0].prompt_logprobs)
        assert not any(r.prompt_logprobs for r in replies[1:])
        assert [p.token_id for p in prompt] == ids[1:]
        assert _close([p.logprob for p in prompt], [lp.logprob for lp in want.prompt_logprobs])


def test_cli_client_prints_one_logprob_line_per_token(router: RouterProcess) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = run(router.address, TEXTS[0], chat=False, out=out, err=err, max_tokens=4, logprobs=2)
    assert code == 0, err.getvalue()
    lines = [line for line in err.getvalue().splitlines() if "logprob=" in line]
    assert len(lines) == 4 and all(line.count(":") == 2 for line in lines)
    assert "finish=length" in err.getvalue()


def test_unasked_requests_carry_no_logprobs(router: RouterProcess) -> None:
    replies = _grpc(router.address, prompt=TEXTS[0], max_tokens=3)
    assert not any(r.logprobs or r.prompt_logprobs for r in replies)


@pytest.mark.parametrize("bad", [-1, 21])
def test_bad_logprobs_are_invalid_argument(router: RouterProcess, bad: int) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _grpc(router.address, prompt="Hi", max_tokens=2, logprobs=bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "logprobs" in info.value.details()


def test_colocated_worker_logprobs_and_bad_values(cluster: Cluster) -> None:
    """The Decode RPC on a colocated worker (it prefills itself) carries them too, and
    refuses out-of-range ``logprobs`` with INVALID_ARGUMENT."""
    llm = reference_llm()
    ids = llm.engine.encode(TEXTS[0])
    params = SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1, prompt_logprobs=True
    )
    (want,) = llm.generate([ids], params)
    stub = worker_pb2_grpc.DecodeWorkerStub(cluster.channel(cluster.colocated))
    sampling = worker_pb2.SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1, prompt_logprobs=True
    )
    replies = list(stub.Decode(decode_request("lp-colocated", ids, sampling), timeout=60))
    assert replies[0].prefilled_by == "local"
    entries = [lp for r in replies for lp in r.logprobs]
    assert [e.token_id for e in entries] == want.token_ids
    assert _close([e.logprob for e in entries], [lp.logprob for lp in want.logprobs])
    prompt = [p.logprob for p in replies[0].prompt_logprobs]
    assert _close(prompt, [lp.logprob for lp in want.prompt_logprobs])
    bad = worker_pb2.SamplingParams(max_tokens=2, logprobs=25)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Decode(decode_request("lp-bad", ids, bad), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def client(router: RouterProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{router.http_address}/v1", api_key="unused")


def test_openai_completion_logprobs(router: RouterProcess, client: openai.OpenAI) -> None:
    want = _grpc(router.address, prompt=TEXTS[0], max_tokens=MAX_TOKENS, logprobs=2)
    want_lps = [lp for r in want for lp in r.logprobs]
    reply = client.completions.create(
        model="", prompt=TEXTS[0], max_tokens=MAX_TOKENS, temperature=0, logprobs=2
    )
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == MAX_TOKENS
    assert "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    assert _close(lp.token_logprobs, [e.logprob for e in want_lps])
    assert all(len(top) <= 2 and max(top.values()) <= 0.0 for top in lp.top_logprobs)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="", prompt="Hi", max_tokens=2, logprobs=21)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "logprobs"


def test_openai_chat_logprobs_whole_and_streamed(
    router: RouterProcess, client: openai.OpenAI
) -> None:
    messages = [{"role": "user", "content": TEXTS[0]}]
    want = _grpc(router.address, prompt=TEXTS[0], chat=True, max_tokens=MAX_TOKENS, logprobs=2)
    want_lps = [lp.logprob for r in want for lp in r.logprobs]
    reply = client.chat.completions.create(
        model="",
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = reply.choices[0].logprobs.content
    assert _close([c.logprob for c in content], want_lps)
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert all(c.bytes == list(c.token.encode()) for c in content)
    stream = client.chat.completions.create(
        model="",
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
        stream=True,
    )
    streamed = [
        c.logprob
        for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs
        for c in chunk.choices[0].logprobs.content or ()
    ]
    assert _close(streamed, want_lps)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="", messages=messages, logprobs=True, top_logprobs=21)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "top_logprobs"
