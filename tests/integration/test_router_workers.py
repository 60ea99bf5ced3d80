"""The router in front of real workers: real processes, real Redis, the real model.

One set for the module, all on loopback:

    pool "chat"   prefill-a, prefill-b (prefill workers) → decode-a (decode worker, policy
                  ``fail``: a failed prefill comes back to the router, which retries)
    pool "code"   colocated-c (a colocated worker with a small 64-block KV cache)
    pool "empty"  no worker
    router        ``python -m router`` with semantic routes code → "code", chitchat → "chat"

Expected outputs come from the single-process engine (``engine.LLM``), greedy.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from common.server_process import RouterProcess
from engine import LLM, SamplingParams
from proto import serving_pb2
from router.client import build_request, collect, stream_generate
from tests.integration.workers_harness import (
    SMALL_ENGINE,
    WorkerProcess,
    start_workers,
    status,
    wait_idle,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SYSTEM = (
    "You are Quill, the documentation assistant of the Lighthouse project. Answer in plain "
    "English, cite the section of the handbook you rely on, never invent command-line "
    "flags, prefer short examples over long explanations, and say so when a question is "
    "outside the handbook. The handbook covers installation on Linux and macOS, the "
    "configuration file format, the plugin system, logging and metrics, upgrades between "
    "major versions, and the security model, including how secrets are stored, rotated "
    "and audited. Keep every answer under one hundred words unless asked for more. "
) * 2  # ~250 tokens: 15+ shared blocks

SEMANTIC_ROUTES = [
    {
        "name": "code",
        "pool": "code",
        "utterances": [
            "How do I reverse a linked list in Python?",
            "How do I sort a list of dictionaries by a key in Python?",
            "Why does my C++ program segfault when I dereference this pointer?",
            "Write a SQL query that joins two tables and groups by a column",
            "Fix the bug in this JavaScript function",
            "What does this stack trace mean and how do I fix the exception?",
            "How do I read a CSV file with pandas?",
            "Explain what a Python decorator does with an example",
        ],
    },
    {
        "name": "chitchat",
        "pool": "chat",
        "utterances": [
            "Hi! How are you doing today?",
            "What's your favourite movie?",
            "Tell me something fun about your weekend",
            "Good morning, nice to meet you",
            "Do you like music?",
        ],
    },
]


@dataclass
class Stack:
    router: RouterProcess
    workers: dict[str, WorkerProcess]
    redis_url: str
    namespace: str
    log_dir: Path

    @property
    def address(self) -> str:
        return self.router.address


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    namespace = f"router-{uuid.uuid4().hex[:6]}"
    log_dir = tmp_path_factory.mktemp("router-stack")
    common = ["--redis-url", redis_url, "--namespace", namespace, *SMALL_ENGINE]
    specs = [
        ("prefill_worker", "prefill-a", [*common, "--pool", "chat"]),
        ("prefill_worker", "prefill-b", [*common, "--pool", "chat"]),
        (
            "decode_worker",
            "decode-a",
            [*common, "--pool", "chat", "--on-prefill-failure", "fail", "--prefill-timeout", "8"],
        ),
        (
            "decode_worker",
            "colocated-c",
            [*common, "--pool", "code", "--colocated", "--num-kv-blocks", "64"],
        ),
    ]
    config = {
        "default_pool": "chat",
        "pools": [{"name": "chat"}, {"name": "code"}, {"name": "empty"}],
        "semantic": {"threshold": 0.45, "routes": SEMANTIC_ROUTES},
    }
    config_path = log_dir / "router.yaml"
    config_path.write_text(yaml.safe_dump(config))
    router = RouterProcess(
        [
            "--config",
            str(config_path),
            "--redis-url",
            redis_url,
            "--namespace",
            namespace,
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--log-level",
            "INFO",
        ],
        log_dir / "router.log",
    )
    workers: list[WorkerProcess] = []
    try:
        workers = start_workers(specs, log_dir)  # model loads overlap with the router's
        router.wait_ready()
        stack = Stack(router, {w.name: w for w in workers}, redis_url, namespace, log_dir)
        wait_until(lambda: _live(stack) == {"chat": 3, "code": 1}, 20, "the router sees workers")
        yield stack
    finally:
        router.kill()
        for worker in workers:
            worker.kill()


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", num_kv_blocks=256, num_threads=1)  # = SMALL_ENGINE's dtype


def _live(stack: Stack) -> dict[str, int]:
    with grpc.insecure_channel(stack.address) as channel:
        from proto import serving_pb2_grpc

        reply = serving_pb2_grpc.GenerationStub(channel).ListModels(
            serving_pb2.ListModelsRequest(), timeout=5
        )
    return {m.pool: m.prefill_workers + m.decode_workers for m in reply.models if m.pool != "empty"}


def ask(stack: Stack, prompt: str | None = None, timeout_s: float = 120.0, **options: object):
    request = build_request(prompt, **options)  # type: ignore[arg-type]
    return collect(stream_generate(stack.address, request, timeout_s))


def error_of(stack: Stack, prompt: str | None = None, **options: object) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as info:
        ask(stack, prompt, **options)
    return info.value.code().name, info.value.details() or ""  # type: ignore[attr-defined]


# ---- correctness ------------------------------------------------------------------------------


def test_greedy_output_equals_the_single_process_engine(stack: Stack, llm: LLM) -> None:
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    texts = ["The capital of France is", "Water boils at", "def fibonacci(n):\n    "]
    expected = llm.generate(texts, greedy)
    for pool in ("chat", "code"):
        for text, want in zip(texts, expected, strict=True):
            got = ask(stack, text, model=pool, max_tokens=16)
            assert list(got.token_ids) == want.token_ids, (pool, text)
            assert got.text == want.text
            assert got.route.pool == pool
            assert got.usage.completion_tokens == len(want.token_ids)
    chat = [{"role": "user", "content": "Name three colours."}]
    want = llm.chat(chat, greedy)[0]
    got = ask(stack, messages=[("user", "Name three colours.")], model="chat", max_tokens=16)
    assert (list(got.token_ids), got.text) == (want.token_ids, want.text)
    ids = llm.engine.encode("Once upon a time")
    want = llm.generate([ids], greedy)[0]
    got = ask(stack, token_ids=ids, model="chat", max_tokens=16)
    assert list(got.token_ids) == want.token_ids
    assert got.route.prefill_worker in ("prefill-a", "prefill-b")
    assert got.route.decode_worker == "decode-a"


# ---- prefix-aware routing -----------------------------------------------------------------------


def test_shared_system_prompt_lands_on_the_worker_that_holds_it(stack: Stack) -> None:
    questions = [
        "How do I install it on macOS?",
        "Where are secrets stored?",
        "How do I upgrade from version 2?",
        "Which log levels exist?",
    ]
    results = [
        ask(stack, messages=[("system", SYSTEM), ("user", q)], model="chat", max_tokens=4)
        for q in questions
    ]
    holder = results[0].route.prefill_worker
    assert holder in ("prefill-a", "prefill-b")
    for result in results[1:]:
        assert result.route.prefill_worker == holder
        assert result.route.predicted_cached_tokens >= 16 * 14
        assert result.usage.cached_tokens >= 16 * 14  # reported by the prefill worker
        assert result.usage.cached_tokens <= result.usage.prompt_tokens
    # A stop string ends the stream at the router; usage still reports the cache hit.
    stopped = ask(stack, messages=[("system", SYSTEM), ("user", "Tell me more.")],
                  model="chat", max_tokens=16, stop=[" "])  # fmt: skip
    assert stopped.finish_reason == "stop" and stopped.route.prefill_worker == holder
    assert stopped.usage.cached_tokens >= 16 * 14


def test_new_prefixes_spread_by_load(stack: Stack) -> None:
    prompts = [
        f"Story {i}: " + f"a tale number {i} about the sea and a ship. " * 20 for i in range(6)
    ]
    results: list = [None] * len(prompts)

    def run(i: int) -> None:
        results[i] = ask(stack, prompts[i], model="chat", max_tokens=2)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    used = [r.route.prefill_worker for r in results]
    assert set(used) == {"prefill-a", "prefill-b"}, used
    assert max(used.count("prefill-a"), used.count("prefill-b")) <= 4


# ---- semantic routing -------------------------------------------------------------------------


def test_semantic_routes_send_code_and_chitchat_to_different_pools(stack: Stack) -> None:
    code = ask(
        stack, messages=[("user", "How do I merge two dictionaries in Python?")], max_tokens=4
    )
    chat = ask(stack, messages=[("user", "Hey there, how is your day going?")], max_tokens=4)
    assert (code.route.pool, code.route.semantic_route) == ("code", "code")
    assert code.route.decode_worker == "colocated-c"
    assert (chat.route.pool, chat.route.semantic_route) == ("chat", "chitchat")
    assert chat.route.decode_worker == "decode-a"
    # Nothing near enough: the default pool, no route name.
    other = ask(stack, "Zebra quantum marmalade seventeen.", max_tokens=2)
    assert (other.route.pool, other.route.semantic_route) == ("chat", "")


# ---- statuses ---------------------------------------------------------------------------------


def test_each_status_from_a_real_request_and_the_router_keeps_serving(stack: Stack) -> None:
    long_prompt = "The lighthouse keeper wrote in his log every night. " * 120  # 1200 tokens
    cases = [
        ({"prompt": ""}, "INVALID_ARGUMENT", "prompt is empty"),
        ({"messages": [("narrator", "hi")]}, "INVALID_ARGUMENT", "unknown role"),
        ({"prompt": "hi", "max_tokens": 8192}, "INVALID_ARGUMENT", "too large"),
        ({"prompt": "hi", "temperature": -0.5}, "INVALID_ARGUMENT", "temperature"),
        ({"prompt": "hi", "top_p": 1.5}, "INVALID_ARGUMENT", "top_p"),
        ({"prompt": "x" * 1_000_001}, "INVALID_ARGUMENT", "request too large"),
        ({"prompt": "hi", "model": "gpt-17"}, "NOT_FOUND", "unknown model"),
        ({"prompt": long_prompt, "model": "code"}, "RESOURCE_EXHAUSTED", "refused"),
        ({"prompt": "hi", "model": "empty"}, "UNAVAILABLE", "no live worker"),
    ]
    for options, code, needle in cases:
        got, details = error_of(stack, **options)  # type: ignore[arg-type]
        assert got == code and needle in details, (list(options), got, details)
        ok = ask(stack, "Good morning", model="chat", max_tokens=2)
        assert ok.finish_reason in ("stop", "length")


# ---- cancellation and deadlines ---------------------------------------------------------------


def test_cancellation_and_deadlines_reach_the_workers(stack: Stack) -> None:
    decode = grpc.insecure_channel(stack.workers["decode-a"].grpc_address)
    try:
        request = build_request(
            "Count slowly: one, two,", model="chat", max_tokens=400, ignore_eos=True
        )
        responses = stream_generate(stack.address, request, 120)
        first = next(responses)
        assert first.route.decode_worker == "decode-a"
        wait_until(lambda: status(decode).running == 1, 10, "the request in decode's batch")
        responses.close()  # the client goes away mid-stream
        wait_idle(decode, 20)

        with pytest.raises(grpc.RpcError) as info:
            collect(stream_generate(stack.address, request, timeout_s=1.5))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        wait_idle(decode, 20)
    finally:
        decode.close()


# ---- failures -------------------------------------------------------------------------------


def test_killing_a_prefill_worker_loses_no_request_before_its_first_token(stack: Stack) -> None:
    common = ["--redis-url", stack.redis_url, "--namespace", stack.namespace, *SMALL_ENGINE]
    (doomed,) = start_workers(
        [("prefill_worker", "prefill-x", [*common, "--pool", "chat"])], stack.log_dir
    )
    try:
        wait_until(lambda: _live(stack)["chat"] == 4, 20, "the router sees prefill-x")
        results: list = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def client(n: int) -> None:
            i = 0
            while not stop.is_set():
                prompt = f"Client {n} request {i}: " + "describe the harbour at dawn. " * 12
                try:
                    results.append(ask(stack, prompt, model="chat", max_tokens=3))
                except BaseException as exc:
                    errors.append(exc)
                i += 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        wait_until(
            lambda: any(r.route.prefill_worker == "prefill-x" for r in results),
            60,
            "traffic on prefill-x",
        )
        doomed.signal(signal.SIGKILL)
        killed_at = len(results)
        time.sleep(4.0)  # past the registration TTL: it leaves the registry
        stop.set()
        for thread in threads:
            thread.join(120)
        assert not errors, [str(e) for e in errors]
        after = results[killed_at:]
        assert after, "no request completed after the kill"
        assert all(r.finish_reason in ("stop", "length") for r in results)
        assert all(r.route.prefill_worker != "prefill-x" for r in results[killed_at + 3 :])
        wait_until(lambda: _live(stack)["chat"] == 3, 20, "prefill-x gone from the registry")
    finally:
        doomed.kill()


def test_metrics_cover_requests_latencies_and_routing(stack: Stack) -> None:
    import urllib.request

    with urllib.request.urlopen(f"http://{stack.router.metrics_address}/metrics", timeout=5) as r:
        text = r.read().decode()
    for needle in (
        'pdserve_router_requests_total{pool="chat",route="",status="OK"}',
        'status="INVALID_ARGUMENT"',
        'status="NOT_FOUND"',
        'status="RESOURCE_EXHAUSTED"',
        'status="UNAVAILABLE"',
        'pdserve_router_requests_total{pool="code",route="code",status="OK"}',
        "pdserve_router_ttft_seconds_bucket",
        "pdserve_router_itl_seconds_bucket",
        "pdserve_router_e2e_seconds_bucket",
        'pdserve_router_routing_decision_seconds_bucket{le="0.0002",policy="prefix_aware",pool="chat"}',
        "pdserve_router_prefix_hit_ratio_bucket",
        "pdserve_router_cached_tokens_total",
    ):
        assert needle in text, needle
