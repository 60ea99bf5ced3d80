"""Int8 weight-only quantization on CUDA: the compiled Triton GEMM at the default model's
shapes against the torch reference, and an int8 engine on the GPU (greedy against the
unquantized GPU engine, CUDA-graph decoding against eager). ``make test-gpu`` runs these;
``make test`` deselects the ``gpu`` marker. A few seconds on one GPU.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine import quantization as q
from tests.integration.test_engine_correctness import PROMPTS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
SHAPES = [(960, 576), (3072, 576), (576, 1536), (49152, 576)]  # qkv, gate/up, down, lm_head


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 7, 33, 300])
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_linear_on_cuda_matches_reference(dtype, rows, shape) -> None:
    gen = torch.Generator().manual_seed(rows)
    layer = q.Int8Linear.from_linear(torch.nn.Linear(shape[1], shape[0])).cuda()
    x = torch.randn(rows, shape[1], generator=gen).to(dtype).cuda()
    out = layer(x)
    ref = q.reference_int8_linear(x.float(), layer.weight_int8, layer.scales, layer.bias.float())
    assert out.dtype == dtype and out.is_cuda
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_int8_engine_on_cuda_tracks_the_unquantized_one() -> None:
    plain = LLM(device="cuda", dtype="bfloat16", num_kv_blocks=256)
    int8 = LLM(device="cuda", dtype="bfloat16", quantization="int8", num_kv_blocks=256)
    assert isinstance(int8.engine.model.lm_head, q.Int8Linear)
    ref = [o.token_ids for o in plain.generate(PROMPTS, GREEDY)]
    got = [o.token_ids for o in int8.generate(PROMPTS, GREEDY)]
    assert all(a[0] == b[0] for a, b in zip(ref, got, strict=True)), (ref, got)
    assert "Paris" in int8.engine.decode(got[0])


def test_int8_cuda_graph_decode_equals_eager() -> None:
    graphs = LLM(device="cuda", dtype="bfloat16", quantization="int8", num_kv_blocks=256)
    eager = LLM(
        device="cuda", dtype="bfloat16", quantization="int8", num_kv_blocks=256, cuda_graphs=False
    )
    assert graphs.engine.runner.graphs is not None
    got = [o.token_ids for o in graphs.generate(PROMPTS, GREEDY)]
    want = [o.token_ids for o in eager.generate(PROMPTS, GREEDY)]
    assert got == want
