"""The engine on the real SmolLM2 model: same tokens as HF, batching-invariant, cached.

Every engine here is pinned to fp32 (HF parity is exact only there); bf16, the default
where the CPU has it, is checked against these fp32 engines in test_engine_bf16.py.
"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.integration.engine_helpers import hf_greedy, hf_model

FP32 = "float32"
GREEDY_32 = SamplingParams(max_tokens=32, temperature=0.0)

PROMPTS = [
    "The capital of France is",
    "def quicksort(items):",
    "Once upon a time, in a land far away,",
    "Explain photosynthesis to a ten year old.",
    "1, 2, 3, 5, 8, 13,",
    "SELECT name, email FROM users WHERE",
    "La vie est belle parce que",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype=FP32, num_kv_blocks=768, max_num_batched_tokens=512)


def long_prompt(llm: LLM) -> list[int]:
    text = " ".join(f"Item {i} is a {('red', 'green', 'blue')[i % 3]} box." for i in range(60))
    ids = llm.engine.encode(text + " Which colour is item 41?")
    assert len(ids) > 300
    return ids


def chat_prompt(llm: LLM) -> list[int]:
    return llm.engine.apply_chat_template(
        [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Name three planets."},
        ]
    )


def test_greedy_matches_hf_generate(llm: LLM) -> None:
    prompts = [llm.engine.encode(p) for p in PROMPTS] + [chat_prompt(llm), long_prompt(llm)]
    outputs = llm.generate(prompts, GREEDY_32)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == hf_greedy(hf_model(), prompt, 32), llm.engine.decode(prompt)
        assert output.prompt_tokens == len(prompt)


def test_page_first_cache_matches_hf_generate(llm: LLM) -> None:
    """Engines default to a layer-first cache (the ``llm`` fixture); a page-first one
    (strided layer views, slots of ``row_stride``) computes what HF does too: chunked
    prefill (128-token steps), batched decode, and a cached prefix."""
    assert llm.engine.layout.order == "layer_first"
    other = LLM(
        dtype=FP32, num_kv_blocks=256, max_num_batched_tokens=128, kv_cache_order="page_first"
    )
    prefix = long_prompt(llm)[:200]
    first = [llm.engine.encode(p) for p in PROMPTS[:3]] + [prefix + llm.engine.encode(" Why?")]
    second = prefix + llm.engine.encode(" Which box is blue?")
    outputs = other.generate(first, GREEDY_32) + other.generate([second], GREEDY_32)
    assert outputs[-1].cached_tokens >= 192
    for prompt, output in zip([*first, second], outputs, strict=True):
        assert output.token_ids == hf_greedy(hf_model(), prompt, 32), llm.engine.decode(prompt)


def test_concurrent_mixed_lengths_equal_solo_runs(llm: LLM) -> None:
    base = long_prompt(llm)
    prompts = [base[: 8 + (37 * i) % 300] for i in range(32)]
    params = [
        SamplingParams(max_tokens=4 + (5 * i) % 20, temperature=0.0, ignore_eos=True)
        for i in range(32)
    ]
    together = llm.generate(prompts, params)
    for prompt, p, output in zip(prompts, params, together, strict=True):
        assert len(output.token_ids) == p.max_tokens
        assert llm.generate([prompt], p)[0].token_ids == output.token_ids


def test_shared_prefix_is_served_from_cache(llm: LLM) -> None:
    prefix = long_prompt(llm)[:200]
    first = llm.generate([prefix + llm.engine.encode(" First question?")], GREEDY_32)[0]
    prompt = prefix + llm.engine.encode(" Second question, a different one?")
    cached = llm.generate([prompt], GREEDY_32)[0]
    assert cached.cached_tokens >= 192
    assert first.cached_tokens < 192 or first.prompt_tokens > 0
    fresh = LLM(dtype=FP32, num_kv_blocks=128, enable_prefix_caching=False).generate(
        [prompt], GREEDY_32
    )[0]
    assert fresh.cached_tokens == 0
    assert cached.token_ids == fresh.token_ids


def test_chunked_prefill_and_preemption_keep_tokens(llm: LLM) -> None:
    prompts = [long_prompt(llm)[: 100 + 40 * i] for i in range(6)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    # 48 blocks cannot hold six ~200-token sequences at once: the scheduler must preempt,
    # and a 64-token budget forces every prompt through chunked prefill.
    tight = LLM(
        dtype=FP32, num_kv_blocks=48, max_num_batched_tokens=64, enable_prefix_caching=False
    )
    assert [o.token_ids for o in tight.generate(prompts, params)] == expected
    assert tight.engine.block_manager.num_used_blocks == 0


def test_seeded_sampling_is_reproducible_across_batches(llm: LLM) -> None:
    prompt = llm.engine.encode("Write a short poem about the sea.")
    seeded = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = llm.generate([prompt], seeded)[0].token_ids
    others = SamplingParams(max_tokens=16, temperature=1.0)
    batch = llm.generate(
        [llm.engine.encode("Hello"), prompt, llm.engine.encode("Bye")], [others, seeded, others]
    )
    assert batch[1].token_ids == alone
    different = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=99)
    assert llm.generate([prompt], different)[0].token_ids != alone


def test_abort_frees_blocks(llm: LLM) -> None:
    engine = llm.engine
    before = engine.block_manager.num_used_blocks
    engine.add_request("to-abort", long_prompt(llm), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.block_manager.num_used_blocks > before
    assert engine.abort("to-abort")
    assert engine.block_manager.num_used_blocks == before
    assert not engine.has_unfinished()
    assert not engine.abort("to-abort")


def test_text_and_finish_reason(llm: LLM) -> None:
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=3, temperature=0.0))
    assert out[0].finish_reason.value == "length"
    assert out[0].text == llm.engine.decode(out[0].token_ids)
    assert out[0].text.strip()
