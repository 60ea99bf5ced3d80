"""The OpenAI-compatible HTTP API with the official ``openai`` client, API keys and TLS.

Real workers (the session set of :mod:`tests.integration.workers_cluster`: two prefill
workers, a decode worker, a colocated worker, pool ``default``) behind two routers:

    open      ``python -m router --http-port 0``: plaintext, no keys
    guarded   the same with ``--api-key-file`` and a self-signed certificate made here:
              both ports on TLS, both require a key

Greedy text over HTTP equals the gRPC path's; the gRPC replies are the reference.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest

from common.server_process import RouterProcess
from proto import serving_pb2, serving_pb2_grpc
from router.client import build_request, collect, stream_generate
from tests.integration.workers_cluster import NAMESPACE, Cluster, cluster_fixture  # noqa: F401
from tests.integration.workers_harness import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

KEY = "sk-test-0123456789"
LONG = (
    "The lighthouse keeper kept a log of every ship that passed the point, noting its "
    "name, its flag, the hour and the weather, and in forty years he never missed a day. "
) * 2  # > 2 blocks of 16 tokens: a repeat hits the prefix cache


def _start_router(cluster: Cluster, log: Path, *extra: str) -> RouterProcess:
    args = ["--redis-url", cluster.redis_url, "--namespace", NAMESPACE, "--port", "0"]
    args += ["--http-port", "0", "--metrics-port", "0", *extra]
    return RouterProcess(args, log)


def _live_workers(address: str, credentials: grpc.ChannelCredentials | None = None) -> int:
    channel = (
        grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    )
    with channel:
        reply = serving_pb2_grpc.GenerationStub(channel).ListModels(
            serving_pb2.ListModelsRequest(),
            timeout=5,
            metadata=[("authorization", f"Bearer {KEY}")],
        )
    return sum(m.prefill_workers + m.decode_workers for m in reply.models)


@pytest.fixture(scope="module")
def router(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    log_dir = tmp_path_factory.mktemp("http-router")
    process = _start_router(cluster, log_dir / "router.log")
    try:
        process.wait_ready()
        wait_until(lambda: _live_workers(process.address) == 4, 20, "the router sees 4 workers")
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def client(router: RouterProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{router.http_address}/v1", api_key="unused")


def _grpc(router: RouterProcess, prompt: str, **options: object):
    request = build_request(prompt, **options)  # type: ignore[arg-type]
    return collect(stream_generate(router.address, request, 120))


# ---- completions and chat ---------------------------------------------------------------------


def test_greedy_text_equals_the_grpc_path(router: RouterProcess, client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    expected = _grpc(router, prompt, max_tokens=12)
    whole = client.completions.create(model="", prompt=prompt, max_tokens=12, temperature=0)
    assert whole.choices[0].text == expected.text
    assert whole.choices[0].finish_reason == expected.finish_reason == "length"
    assert whole.usage.prompt_tokens == expected.usage.prompt_tokens
    assert whole.usage.completion_tokens == 12 and whole.usage.total_tokens == (
        whole.usage.prompt_tokens + 12
    )
    assert whole.model == "SmolLM2-135M-Instruct" and whole.object == "text_completion"

    stream = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected.text

    chat_expected = _grpc(router, prompt, chat=True, max_tokens=12)
    messages = [{"role": "user", "content": prompt}]
    reply = client.chat.completions.create(
        model="default", messages=messages, max_completion_tokens=12, temperature=0
    )
    assert reply.choices[0].message.content == chat_expected.text
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == chat_expected.usage.prompt_tokens
    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_cached_tokens_stop_strings_and_n(router: RouterProcess, client: openai.OpenAI) -> None:
    first = client.completions.create(model="", prompt=LONG, max_tokens=4, temperature=0)
    again = client.completions.create(model="", prompt=LONG, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens >= 16

    full = client.completions.create(
        model="", prompt="Water boils at", max_tokens=12, temperature=0
    )
    text = full.choices[0].text
    stop = text.strip().split()[1]  # the second word: cut before it
    cut = client.completions.create(
        model="", prompt="Water boils at", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]

    two = client.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=8,
        temperature=0,
        n=2,
    )
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content == two.choices[1].message.content  # greedy
    assert two.usage.completion_tokens > 0 and two.usage.completion_tokens % 2 == 0
    sampled = client.completions.create(
        model="", prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=7, n=2
    )
    assert len(sampled.choices) == 2
    repeat = client.completions.create(
        model="", prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=7, n=2
    )
    assert [c.text for c in repeat.choices] == [c.text for c in sampled.choices]  # seed + i


def test_errors_have_the_openai_shape(router: RouterProcess, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="", prompt="Hi", temperature=-1)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert "unknown model" in missing.value.body["message"]
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as logprobs:
        client.completions.create(model="", prompt="Hi", logprobs=21)
    assert (
        "logprobs" in logprobs.value.body["message"] and logprobs.value.body["param"] == "logprobs"
    )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="", messages=[{"role": "user", "content": "Hi"}], logprobs=True, top_logprobs=-1
        )
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="", prompt="Hi", max_tokens=10**6)
    assert "max_tokens" in too_long.value.body["message"]
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]


def test_a_client_that_disconnects_cancels_its_request(
    router: RouterProcess, client: openai.OpenAI
) -> None:
    def cancelled() -> float:
        url = f"http://{router.metrics_address}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        found = re.findall(r'router_requests_total\{[^}]*status="CANCELLED"[^}]*\} (\S+)', text)
        return sum(float(v) for v in found)

    before = cancelled()
    stream = client.completions.create(
        model="", prompt="Count to a thousand:", max_tokens=400, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    next(iter(stream))
    stream.close()
    wait_until(lambda: cancelled() == before + 1, 10, "the request cancelled on the router")


# ---- API keys and TLS ----------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_keys_and_tls_on_both_ports(cluster: Cluster, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# operators\n\n{KEY}\nsk-other\n")
    process = _start_router(
        cluster, tmp_path / "router.log",
        "--api-key-file", str(keys), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
    )  # fmt: skip
    trust = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    try:
        process.wait_ready(credentials=trust)  # gRPC health: open without a key
        assert KEY not in (tmp_path / "router.log").read_text()
        wait_until(lambda: _live_workers(process.address, trust) == 4, 20, "4 workers")

        with grpc.secure_channel(process.address, trust) as channel:
            stub = serving_pb2_grpc.GenerationStub(channel)
            request = build_request("Hi", max_tokens=2)
            for metadata in ([], [("authorization", "Bearer sk-wrong")]):
                with pytest.raises(grpc.RpcError) as denied:
                    list(stub.Generate(request, timeout=30, metadata=metadata))
                assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = collect(stream_generate(process.address, request, 60, KEY, str(cert)))
        assert ok.usage is not None and ok.usage.completion_tokens == 2  # router.client

        https = f"https://{process.http_address}"
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(f"{https}/health", context=context, timeout=10) as reply:
            assert reply.status == 200  # open without a key
        with pytest.raises(urllib.error.URLError):  # a client that does not trust it
            urllib.request.urlopen(f"{https}/health", timeout=10)
        import httpx2 as httpx  # the openai client's HTTP stack

        keyless = urllib.request.Request(
            f"{https}/v1/completions",
            data=json.dumps({"prompt": "Hi", "max_tokens": 2}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as none:
            urllib.request.urlopen(keyless, context=context, timeout=10)
        assert none.value.code == 401
        assert json.loads(none.value.read())["error"]["code"] == "invalid_api_key"
        bad = openai.OpenAI(
            base_url=f"{https}/v1", api_key="sk-wrong", http_client=httpx.Client(verify=context)
        )
        with pytest.raises(openai.AuthenticationError) as info:
            bad.completions.create(model="", prompt="Hi", max_tokens=2)
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
        good = openai.OpenAI(
            base_url=f"{https}/v1", api_key=KEY, http_client=httpx.Client(verify=context)
        )
        reply = good.chat.completions.create(
            model="", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        assert reply.usage.completion_tokens == 2
    finally:
        process.kill()
