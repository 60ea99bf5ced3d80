"""``quantization="int8"`` (weight-only) against the unquantized engine, same activation dtype.

The contract (measured here 2026-12-02 in brackets):
- loading: every linear layer (fused qkv and gate/up included) and lm_head become
  ``Int8Linear``; the embedding stays float; the default engine is untouched.
- perplexity from ``prompt_logprobs`` on tests/data/english_text.txt (tests/perplexity.py,
  256-token windows): int8 within 3% of the unquantized engine. bf16: the whole text
  (2981 tokens) [17.63 vs 17.73, +0.5%]; fp32: its first 1024 tokens, to stay fast
  [whole text: 17.63 vs 17.68, +0.3%].
- greedy decoding of tests/integration/test_engine_correctness.PROMPTS in one batch, 16
  tokens: the first token agrees on every prompt, the first 4 on the three easy prompts
  (France, quicksort, Fibonacci), and at least 3 of the 7 prompts agree on their first 8
  [index of the first differing token, bf16: 16 16 3 16 10 5 7; fp32: 16 16 6 16 10 4 14].
  int8 rounding moves logits about as much as bf16 does against fp32, so near-ties flip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from engine import LLM, SamplingParams
from engine.quantization import Int8Linear, weight_bytes
from tests.integration.test_engine_correctness import PROMPTS
from tests.perplexity import ENGLISH_TEXT, perplexity

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
EASY = (0, 1, 4)  # indices into PROMPTS: France, quicksort, Fibonacci
DTYPES = ["bfloat16", "float32"]
FP32_TOKENS = 1024  # the fp32 perplexity runs on the text's first 1024 tokens


Engines = Callable[[str, str], LLM]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engines]:
    """``engine(dtype, quantization)``: one engine per pair for this module, then freed."""
    built: dict[tuple[str, str], LLM] = {}

    def get(dtype: str, quantization: str) -> LLM:
        key = (dtype, quantization)
        if key not in built:
            built[key] = LLM(dtype=dtype, quantization=quantization, num_kv_blocks=256)
        return built[key]

    yield get
    built.clear()


def _first_split(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def test_int8_engine_quantizes_every_linear_but_not_the_embedding(engine: Engines) -> None:
    plain, int8 = engine("bfloat16", "none").engine.model, engine("bfloat16", "int8").engine.model
    layer = int8.layers[0]
    for module in (
        layer.self_attn.qkv_proj,
        layer.self_attn.o_proj,
        layer.mlp.gate_up_proj,
        layer.mlp.down_proj,
        int8.lm_head,
    ):
        assert isinstance(module, Int8Linear)
    assert (
        layer.self_attn.qkv_proj.weight_int8.shape
        == plain.layers[0].self_attn.qkv_proj.weight.shape
    )
    assert int8.embed_tokens.weight.dtype == plain.embed_tokens.weight.dtype
    assert not any(isinstance(m, Int8Linear) for m in plain.modules())  # default unchanged
    assert weight_bytes(int8) < 0.75 * weight_bytes(plain)  # [183 vs 257 MiB]


@pytest.mark.parametrize("dtype", DTYPES)
def test_perplexity_within_3_percent(engine: Engines, dtype: str) -> None:
    text = ENGLISH_TEXT.read_text()
    plain, int8 = engine(dtype, "none"), engine(dtype, "int8")
    if dtype == "float32":
        text = plain.engine.decode(plain.engine.encode(text)[:FP32_TOKENS])
    ref, got = perplexity(plain, text, window=256), perplexity(int8, text, window=256)
    assert 5 < ref < 50, ref  # the text is English the model reads well
    assert abs(got - ref) / ref <= 0.03, (ref, got)


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_tokens_agree_with_the_unquantized_engine(engine: Engines, dtype: str) -> None:
    ref = [o.token_ids for o in engine(dtype, "none").generate(PROMPTS, GREEDY)]
    got = [o.token_ids for o in engine(dtype, "int8").generate(PROMPTS, GREEDY)]
    splits = [_first_split(a, b) for a, b in zip(ref, got, strict=True)]
    assert all(s >= 1 for s in splits), splits
    assert all(splits[i] >= 4 for i in EASY), splits
    assert sum(s >= 8 for s in splits) >= 3, splits
    assert "Paris" in engine(dtype, "int8").engine.decode(got[0])
