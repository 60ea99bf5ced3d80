"""Quantized KV cache (fp8 / int8) on CUDA: the compiled quantized decode kernel
(engine/triton_kv_quant.py) against the torch reference, and the engine with
``kv_cache_dtype`` fp8 / int8 — CUDA graphs against eager, greedy tokens against the
unquantized engine's first tokens. ``make test-gpu`` runs the tests/gpu folder; without
CUDA these skip (the kernel is interpreter-tested in tests/unit/test_kv_quant_triton.py).
Not yet run on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams, kv_quant

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):\n    ",
]


@pytest.mark.parametrize("kind", [kv_quant.FP8, kv_quant.INT8])
def test_compiled_quantized_decode_matches_the_reference(kind: str) -> None:
    from engine import triton_kv_quant

    gen = torch.Generator().manual_seed(0)
    k = kv_quant.quantize(torch.randn(20, 16, 3, 64, generator=gen) * 3, kind).cuda()
    v = kv_quant.quantize(torch.randn(20, 16, 3, 64, generator=gen), kind).cuda()
    q = torch.randn(4, 9, 64, generator=gen).cuda().to(torch.bfloat16)
    tables = torch.randperm(20, generator=gen)[:16].view(4, 4).int().cuda()
    lens = torch.tensor([1, 17, 40, 64], dtype=torch.int32, device="cuda")
    out = triton_kv_quant.paged_decode_attention(q, k, v, tables, lens, 0.125)
    ref = triton_kv_quant.reference_paged_decode_attention(q, k, v, tables, lens, 0.125)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_engine_on_cuda_with_a_quantized_cache(kv: str) -> None:
    graphs = LLM(device="cuda", dtype="float32", kv_cache_dtype=kv, num_kv_blocks=256)
    eager = LLM(
        device="cuda", dtype="float32", kv_cache_dtype=kv, num_kv_blocks=256, cuda_graphs=False
    )
    plain = LLM(device="cuda", dtype="float32", num_kv_blocks=256)
    assert graphs.engine.runner.graphs is not None
    assert graphs.engine.geometry().dtype == kv_quant.layout_dtype(kv, "float32")
    prompts = [graphs.engine.encode(p) for p in PROMPTS]
    got = [o.token_ids for o in graphs.generate(prompts, GREEDY)]
    assert got == [o.token_ids for o in eager.generate(prompts, GREEDY)]
    want = [o.token_ids for o in plain.generate(prompts, GREEDY)]
    for mine, theirs in zip(got, want, strict=True):
        assert mine[:3] == theirs[:3]  # quantization noise may flip later near-ties
