"""fp8 / int8 KV cache against the unquantized engine, in process, on the real model.

Model dtype fp32 for all three engines (the same weights and arithmetic; only the KV
cache's format differs), so every difference is the KV quantization's.

Perplexity comes from ``prompt_logprobs`` (tests/perplexity.py). A prompt computed in one
chunk attends over its own fresh, unquantized K/V and would never read the quantized cache
(its log-probs would equal the unquantized engine's exactly). So the engines here chunk
prefills at ``CHUNK`` tokens (``max_num_batched_tokens``, strict FIFO chunking): every
chunk after a window's first attends over the window's earlier K/V *read back from the
quantized cache*, itself included — 3/4 of the predicted tokens of each 256-token window.
The test also checks the quantized perplexities differ from the unquantized one, so the
cache was really read.

Text: the first ``TEXT_CHARS`` characters of tests/data/english_text.txt (~1,250 tokens,
five windows of 256), to keep the three engines' passes to a few seconds each on 2 cores.
Measured on the whole text (2,969 predicted tokens): fp8 +0.28%, int8 +0.10% perplexity.
"""

from __future__ import annotations

import functools
import math

import pytest

from common.sampling import SamplingParams
from tests.perplexity import ENGLISH_TEXT, mean_nll

CHUNK = 64
WINDOW = 256
TEXT_CHARS = 6000
NUM_BLOCKS = 160
# Long enough for two full blocks, which the prefix cache keeps.
PROMPT = (
    "The history of the Roman Empire spans many centuries, beginning with the founding of "
    "the city and ending with the fall of Constantinople. Its most famous emperor was"
)

pytestmark = pytest.mark.timeout(180)


@functools.cache
def _llm(kv_cache_dtype: str) -> object:
    from engine import LLM

    return LLM(
        dtype="float32",
        kv_cache_dtype=kv_cache_dtype,
        num_kv_blocks=NUM_BLOCKS,
        max_num_batched_tokens=CHUNK,
        long_prefill_token_threshold=0,
        num_threads=1,
    )


@functools.cache
def _nll(kv_cache_dtype: str) -> tuple[float, int]:
    return mean_nll(_llm(kv_cache_dtype), ENGLISH_TEXT.read_text()[:TEXT_CHARS], WINDOW)


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_quantized_kv_perplexity_is_within_2_percent(kv: str) -> None:
    base, count = _nll("auto")
    nll, n = _nll(kv)
    assert n == count > 1000
    ratio = math.exp(nll) / math.exp(base)
    assert abs(ratio - 1) <= 0.02, f"{kv} KV perplexity {math.exp(nll):.4f} vs {math.exp(base):.4f}"
    assert nll != base  # the chunked prefill read the quantized cache
    llm = _llm(kv)
    assert llm.engine.block_manager.num_used_blocks == 0  # prompt_logprobs: nothing held


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_engine_generates_with_a_quantized_cache(kv: str) -> None:
    from engine import kv_quant

    llm, ref = _llm(kv), _llm("auto")
    name = kv_quant.layout_dtype(kv, "float32")
    assert llm.engine.layout.dtype == name
    assert llm.engine.geometry().dtype == name
    assert llm.engine.kv_cache.storage.dtype == kv_quant.storage_dtype(name)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    out = llm.generate(PROMPT, params)[0]
    want = ref.generate(PROMPT, params)[0]
    assert len(out.token_ids) == 8
    # The prompt's single chunk attends over fresh K/V; the decodes read the quantized
    # cache and, on this prompt, agree with the unquantized engine.
    assert out.token_ids[:4] == want.token_ids[:4]
    # The prefix cache keeps the quantized blocks: a repeat reuses and reads them.
    again = llm.generate(PROMPT, params)[0]
    assert again.cached_tokens > 0
    assert again.token_ids[:4] == want.token_ids[:4]
    assert llm.engine.block_manager.num_used_blocks == 0
