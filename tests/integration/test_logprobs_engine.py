"""Log-probs of the fp32 engine against HF transformers on the same converted model.

``prompt_logprobs`` (chunked prefill included) and the greedy tokens' ``logprobs`` must
equal ``log_softmax`` of HF's logits within 1e-4; asking for log-probs must not change the
tokens of anyone in the batch; the perplexity helper gives a plausible value.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine import LLM, SamplingParams
from engine.scheduler import SchedulerOutput
from tests.integration.engine_helpers import hf_model
from tests.perplexity import ENGLISH_TEXT, mean_nll

TOL = 1e-4
PROMPTS = [
    "The capital of France is",
    "def quicksort(items):\n    if len(items) <= 1:",
    "Once upon a time, in a land far away, there lived a",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    # A 64-token budget: prompts longer than that are prefilled in several chunks.
    return LLM(dtype="float32", num_kv_blocks=256, max_num_batched_tokens=64)


def hf_logprobs(ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) log-softmax of HF's fp32 logits at every position."""
    with torch.inference_mode():
        logits = hf_model()(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def long_ids(llm: LLM) -> list[int]:
    ids = llm.engine.encode(ENGLISH_TEXT.read_text()[:1200])
    assert len(ids) > 3 * 64  # several prefill chunks
    return ids


def test_prompt_logprobs_match_hf(llm: LLM) -> None:
    prompts = [llm.engine.encode(p) for p in PROMPTS] + [long_ids(llm)]
    outs = llm.generate(
        prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=True)
    )
    for ids, out in zip(prompts, outs, strict=True):
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(ids) - 1
        assert out.logprobs is None  # not asked
        ref = hf_logprobs(ids)
        want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        got = torch.tensor([lp.logprob for lp in out.prompt_logprobs])
        assert [lp.token_id for lp in out.prompt_logprobs] == ids[1:]
        assert torch.allclose(got, want, atol=TOL, rtol=0), (got - want).abs().max()


def test_prompt_logprobs_skip_the_prefix_cache(llm: LLM) -> None:
    ids = long_ids(llm)
    llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0))  # now cached
    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=True))
    assert out[0].cached_tokens == 0
    assert len(out[0].prompt_logprobs) == len(ids) - 1


def test_generated_logprobs_match_hf(llm: LLM) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5)
    for text in PROMPTS:
        ids = llm.engine.encode(text)
        (out,) = llm.generate([ids], params)
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
        ref = hf_logprobs(ids + out.token_ids[:-1])
        for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            row = ref[len(ids) - 1 + i]
            assert lp.token_id == tok
            assert abs(lp.logprob - row[tok].item()) < TOL
            values, top_ids = torch.topk(row, 5)
            assert [t for t, _ in lp.top] == top_ids.tolist()
            assert torch.allclose(torch.tensor([v for _, v in lp.top]), values, atol=TOL, rtol=0)
            assert lp.top[0][0] == tok  # greedy picks the most likely token


def test_mixed_batch_gives_the_same_tokens(llm: LLM) -> None:
    prompts = [llm.engine.encode(p) for p in PROMPTS] + [long_ids(llm)]
    plain = SamplingParams(max_tokens=12, temperature=0.0)
    asking = [
        SamplingParams(max_tokens=12, temperature=0.0, logprobs=3),
        plain,
        SamplingParams(max_tokens=12, temperature=0.0, prompt_logprobs=True, logprobs=0),
        SamplingParams(max_tokens=12, temperature=0.0, prompt_logprobs=True),
    ]
    base = llm.generate(prompts, plain)
    mixed = llm.generate(prompts, asking)
    assert [o.token_ids for o in mixed] == [o.token_ids for o in base]
    assert [o.logprobs is not None for o in mixed] == [True, False, True, False]
    assert [o.prompt_logprobs is not None for o in mixed] == [False, False, True, True]
    assert all(lp.top == () for lp in mixed[2].logprobs)  # logprobs=0: the token alone


def test_sampled_logprobs_are_the_raw_models(llm: LLM) -> None:
    """Temperature does not change the reported log-prob (raw model, like vLLM)."""
    ids = llm.engine.encode(PROMPTS[0])
    (out,) = llm.generate([ids], SamplingParams(max_tokens=1, temperature=2.0, seed=3, logprobs=1))
    ref = hf_logprobs(ids)[-1]
    assert abs(out.logprobs[0].logprob - ref[out.token_ids[0]].item()) < TOL


def test_perplexity_of_the_english_text_is_plausible(llm: LLM) -> None:
    nll, count = mean_nll(llm, ENGLISH_TEXT.read_text(), window=256)
    ppl = math.exp(nll)
    print(f"SmolLM2-135M fp32 perplexity of english_text.txt: {ppl:.3f} over {count} tokens")
    assert count > 2500
    assert 5.0 < ppl < 100.0


def test_preempted_requests_keep_one_prompt_logprob_per_token(llm: LLM) -> None:
    """A KV cache too small for the batch preempts (recomputes) sequences: their prompt
    log-probs are neither duplicated nor changed, their tokens and log-probs the same."""
    text = ENGLISH_TEXT.read_text()
    prompts = [llm.engine.encode(text[i * 400 : i * 400 + 300]) for i in range(4)]
    params = SamplingParams(max_tokens=40, temperature=0.0, logprobs=2, prompt_logprobs=True)
    want = llm.generate(prompts, params)
    small = LLM(dtype="float32", num_kv_blocks=24, max_num_batched_tokens=64)
    preempted: list[str] = []
    schedule = small.engine.scheduler.schedule

    def recording_schedule() -> SchedulerOutput:
        out = schedule()
        preempted.extend(out.preempted)
        return out

    small.engine.scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    got = small.generate(prompts, params)
    assert preempted, "the small cache should have preempted a sequence"
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert [lp.token_id for lp in g.prompt_logprobs] == [
            lp.token_id for lp in w.prompt_logprobs
        ]
        for a, b in zip(
            g.prompt_logprobs + g.logprobs, w.prompt_logprobs + w.logprobs, strict=True
        ):
            assert abs(a.logprob - b.logprob) < TOL
