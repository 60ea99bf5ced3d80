"""The engine on CUDA: compiled Triton decode kernel, greedy tokens against HF on the same
GPU in fp32 and bf16, and CUDA-graph decoding against eager. ``make test-gpu`` runs these
(plus tests/unit/test_triton_ops.py, which compiles the kernels when CUDA is present);
``make test`` deselects the ``gpu`` marker. Sized for well under 8 minutes on one GPU.
"""

from __future__ import annotations

import functools

import pytest
import torch

from engine import LLM, SamplingParams
from engine.cuda_graphs import bucket_sizes
from tests.integration.engine_helpers import default_path
from tests.integration.test_engine_correctness import PROMPTS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
GREEDY_NO_EOS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@functools.cache
def hf_on_gpu(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_path(), dtype=dtype).to("cuda").eval()


def _hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """HF ``generate``'s greedy continuation on the GPU, stopping at EOS like our engine."""
    with torch.inference_mode():
        ids = torch.tensor([prompt], device="cuda")
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


def _prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))


def test_fp32_greedy_matches_hf_on_gpu() -> None:
    llm = LLM(device="cuda", dtype="float32", num_kv_blocks=256)
    assert llm.engine.runner.graphs is not None  # decode steps replay captured graphs
    prompts = [llm.engine.encode(p) for p in PROMPTS]
    for prompt, out in zip(prompts, llm.generate(prompts, GREEDY), strict=True):
        assert out.token_ids == _hf_greedy(hf_on_gpu(torch.float32), prompt, 24)


def test_auto_is_bf16_on_cuda_and_tracks_hf_bf16() -> None:
    llm = LLM(device="cuda", num_kv_blocks=256)
    assert llm.engine.config.dtype == "bfloat16"
    assert llm.engine.geometry().dtype == "bfloat16"
    prompts = [llm.engine.encode(p) for p in PROMPTS]
    hf = hf_on_gpu(torch.bfloat16)
    agreed = [
        _prefix(out.token_ids, _hf_greedy(hf, prompt, 24))
        for prompt, out in zip(prompts, llm.generate(prompts, GREEDY), strict=True)
    ]
    # Same tolerance as tests/integration/test_engine_bf16.py (bf16 near-ties may flip).
    assert min(agreed) >= 4, agreed
    assert sum(n >= 12 for n in agreed) >= 4, agreed


@pytest.mark.parametrize("batch", [1, 3, 17])  # exact bucket, padded to 4, padded to 32
def test_cuda_graph_decode_equals_eager(batch: int) -> None:
    assert (batch in bucket_sizes(64)) == (batch == 1)
    graphs = LLM(device="cuda", dtype="float32", num_kv_blocks=512)
    eager = LLM(device="cuda", dtype="float32", num_kv_blocks=512, cuda_graphs=False)
    assert eager.engine.runner.graphs is None
    base = graphs.engine.encode(" ".join(PROMPTS))
    prompts = [base[: 5 + 7 * i] for i in range(batch)]
    got = [o.token_ids for o in graphs.generate(prompts, GREEDY_NO_EOS)]
    want = [o.token_ids for o in eager.generate(prompts, GREEDY_NO_EOS)]
    assert got == want
    assert graphs.engine.block_manager.num_used_blocks == 0
