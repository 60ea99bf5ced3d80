"""Quantized KV across the prefill → decode boundary.

- In process, real gloo pairs on loopback: an fp8 / int8 cache's blocks — codes and the
  float32 scale inside every row — land bit-exact through whole and layer-wise transfers,
  staged frames and direct pieces, in both cache orders; a peer with another KV dtype is
  refused by the handshake, naming the dtypes.
- Real processes (Redis, gRPC, KV transfer): a prefill worker and a decode worker with
  ``--kv-cache-dtype fp8`` serve requests with the same greedy tokens as one in-process fp8
  engine; a decode worker with ``auto`` KV asked to use the fp8 prefill worker is refused
  by the KV handshake and serves the request by prefilling locally (its default
  ``on_prefill_failure: local``), with the failure counted.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from engine import kv_quant
from engine.kv_cache import ORDERS, KVCache, KVLayout
from kv_transfer.errors import IncompatiblePeer
from kv_transfer.receiver import TorchDistReceiver
from kv_transfer.sender import TorchDistSender
from kv_transfer.types import RecvSpec, SendSpec, TransferConfig, TransferMode, TransferState
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

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
pytestmark = pytest.mark.timeout(180)

CONFIG = TransferConfig(timeout_s=10.0, grace_s=1.0, chunk_bytes=4096, poll_interval_s=0.01)
SETTLE = 20.0
LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, block_size=4, num_blocks=24)
# (config overrides, source blocks, destination blocks): one in-place segment; and a mix
# of direct pieces and staged blocks (3-block and 1-block runs, 2-block frames).
PLANS = {
    "direct": ({"direct_min_bytes": 0}, (0, 1, 2, 3, 4), (10, 11, 12, 13, 14)),
    "mixed": ({"direct_min_bytes": 1024, "chunk_bytes": 1024}, (0, 1, 2, 7, 9), (5, 6, 7, 20, 3)),
}


def _quantized_cache(layout: KVLayout, seed: int) -> KVCache:
    """A cache holding real quantized rows (codes and scales), as attention writes them."""
    cache = KVCache(layout)
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(*cache.tensor.shape[:-1], layout.head_dim, generator=gen) * 5
    cache.tensor.copy_(kv_quant.quantize(values, layout.dtype))
    return cache


@pytest.mark.parametrize("kind", [kv_quant.FP8, kv_quant.INT8])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", list(TransferMode))
@pytest.mark.parametrize("plan", list(PLANS))
def test_quantized_blocks_land_bit_exact(
    kind: str, order: str, mode: TransferMode, plan: str
) -> None:
    extra, src, dst = PLANS[plan]
    layout = dataclasses.replace(LAYOUT, dtype=kind, order=order)
    assert layout.block_shape[-1] == layout.head_dim + kv_quant.SCALE_BYTES
    source = _quantized_cache(layout, 1)
    target = KVCache(layout)
    receiver = TorchDistReceiver(target, "m", CONFIG)
    sender = TorchDistSender(source, "m", dataclasses.replace(CONFIG, **extra))
    try:
        rt = receiver.expect(RecvSpec("t", dst), lambda t: None)
        st = sender.send(SendSpec("t", receiver.address, src, mode), lambda t: None)
        for layer in range(layout.num_layers):
            st.mark_layer_ready(layer)
        assert st.wait(SETTLE) is TransferState.DONE and rt.wait(SETTLE) is TransferState.DONE
        sent, landed = source.gather(torch.tensor(src)), target.gather(torch.tensor(dst))
        assert torch.equal(sent.view(torch.uint8), landed.view(torch.uint8))
        assert torch.equal(
            kv_quant.dequantize(landed, torch.float32), kv_quant.dequantize(sent, torch.float32)
        )
        others = [b for b in range(layout.num_blocks) if b not in dst]
        assert not target.gather(torch.tensor(others)).any()
        assert rt.metrics is not None and rt.metrics.bytes == len(src) * layout.bytes_per_block
    finally:
        sender.close()
        receiver.close()


def test_a_peer_with_another_kv_dtype_is_refused() -> None:
    fp8 = dataclasses.replace(LAYOUT, dtype=kv_quant.FP8)
    receiver = TorchDistReceiver(KVCache(LAYOUT), "m", CONFIG)  # float32: kv_cache_dtype auto
    sender = TorchDistSender(_quantized_cache(fp8, 2), "m", CONFIG)
    try:
        rt = receiver.expect(RecvSpec("t", (1, 2), timeout_s=5), lambda t: None)
        st = sender.send(SendSpec("t", receiver.address, (3, 4), timeout_s=5), lambda t: None)
        assert st.wait(SETTLE) is TransferState.FAILED
        assert isinstance(st.error, IncompatiblePeer)
        assert "dtype" in str(st.error) and "'fp8_e4m3'" in str(st.error)
        assert "'float32'" in str(st.error)
        rt.abort("test over")
        assert not receiver.cache.tensor.any()
    finally:
        sender.close()
        receiver.close()


# ---- real workers ------------------------------------------------------------------------------

TEXTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):\n    ",
]
MAX_TOKENS = 16
FP8 = ("--kv-cache-dtype", "fp8")


@functools.cache
def _fp8_reference() -> object:
    from engine import LLM

    return LLM(dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=256, num_threads=1)


@pytest.fixture(scope="module")
def workers(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list]:
    common = ["--redis-url", redis_url, "--namespace", "kvq-disagg", *SMALL_ENGINE]
    log_dir: Path = tmp_path_factory.mktemp("kvq-workers")
    procs = start_workers(
        [
            ("prefill_worker", "prefill-fp8", [*common, *FP8]),
            ("decode_worker", "decode-fp8", [*common, *FP8]),
            ("decode_worker", "decode-auto", [*common, "--prefill-timeout", "10"]),
        ],
        log_dir,
    )
    yield procs
    for proc in procs:
        proc.kill()


def test_fp8_prefill_and_decode_workers_match_one_fp8_engine(workers: list) -> None:
    from engine import SamplingParams

    prefill, decoder, _ = workers
    llm = _fp8_reference()
    prompts = [llm.engine.encode(text) for text in TEXTS]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    # One prompt at a time, as the workers serve them: fp32 is batch-invariant only to
    # ~1e-6, and a quantized cache turns such a difference into a whole code step now and
    # then (a value on a rounding boundary), so batched and single runs may differ.
    want = [llm.generate(prompt, params)[0].token_ids for prompt in prompts]
    with grpc.insecure_channel(decoder.grpc_address) as channel:
        for i, prompt in enumerate(prompts):
            request = decode_request(f"q{i}", prompt, greedy(MAX_TOKENS, True), prefill)
            result = decode(channel, request)
            assert result.prefilled_by == prefill.worker_id
            assert result.tokens == want[i]
        assert wait_idle(channel).used_blocks == 0
    # The transfer moved fp8 rows: 68 bytes per row of head_dim 64, not 4 * 64.
    blocks = sum(-(-len(p) // 16) for p in prompts)
    landed = metric(decoder, 'pdserve_kv_transfer_bytes_total{role="receiver"}')
    assert landed == blocks * 16 * 2 * 30 * 3 * 68


def test_mismatched_kv_dtypes_are_refused_and_served_locally(workers: list) -> None:
    from engine import SamplingParams

    prefill, _, decoder = workers
    llm = reference_llm()  # fp32, KV auto: what decode-auto computes by itself
    prompt = llm.engine.encode(TEXTS[1])
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = llm.generate(prompt, params)[0].token_ids
    with grpc.insecure_channel(decoder.grpc_address) as channel:
        result = decode(channel, decode_request("mm", prompt, greedy(8, True), prefill))
        assert result.prefilled_by != prefill.worker_id  # not prefilled by the fp8 worker
        assert result.tokens == want
        assert wait_idle(channel).used_blocks == 0
    with grpc.insecure_channel(prefill.grpc_address) as channel:
        assert wait_idle(channel).used_blocks == 0  # the refused send released its blocks
    assert metric(decoder, "pdserve_local_prefill_fallbacks_total") == 1
    assert (
        metric(decoder, 'pdserve_kv_transfer_failures_total{kind="incompatible",role="receiver"}')
        + metric(prefill, 'pdserve_kv_transfer_failures_total{kind="incompatible",role="sender"}')
        >= 1
    )
