"""Perplexity of a text under an engine, from ``SamplingParams(prompt_logprobs=True)``.

Used by the quantization tests (int8 weights, fp8/int8 KV) to compare an engine against
the unquantized one on tests/data/english_text.txt::

    from tests.perplexity import ENGLISH_TEXT, perplexity
    ppl = perplexity(LLM(model, dtype="float32"), ENGLISH_TEXT.read_text(), window=256)

The text is tokenized once and cut into non-overlapping windows of ``window`` tokens
(the last may be shorter); each window is one prompt, all submitted in one batch. The
first token of each window has no log-prob (nothing before it), so the perplexity is
``exp(-mean log p)`` over the remaining tokens of every window.
"""

from __future__ import annotations

import math
from pathlib import Path

from common.sampling import SamplingParams

ENGLISH_TEXT = Path(__file__).parent / "data" / "english_text.txt"


def window_token_ids(llm: object, text: str, window: int) -> list[list[int]]:
    """The text's tokens cut into windows of at most ``window`` tokens (>= 2 each)."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    ids = llm.engine.encode(text)  # type: ignore[attr-defined]
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    return [w for w in windows if len(w) >= 2]


def mean_nll(llm: object, text: str, window: int = 256) -> tuple[float, int]:
    """(mean negative log-likelihood per predicted token, number of predicted tokens)."""
    windows = window_token_ids(llm, text, window)
    if not windows:
        raise ValueError("text is too short for a perplexity")
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=True)
    outputs = llm.generate(windows, params)  # type: ignore[attr-defined]
    total, count = 0.0, 0
    for tokens, out in zip(windows, outputs, strict=True):
        logprobs = out.prompt_logprobs
        if logprobs is None or len(logprobs) != len(tokens) - 1:
            raise AssertionError(f"{out.request_id}: prompt_logprobs missing or short")
        total -= sum(lp.logprob for lp in logprobs)
        count += len(logprobs)
    return total / count, count


def perplexity(llm: object, text: str, window: int = 256) -> float:
    """``exp`` of the mean negative log-likelihood of ``text`` in ``window``-token windows."""
    nll, _ = mean_nll(llm, text, window)
    return math.exp(nll)
