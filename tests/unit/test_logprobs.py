"""engine/logprobs.py and SamplingParams' logprob fields, on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from common.sampling import SamplingParams
from engine.logprobs import PROMPT_ROWS_PER_PASS, prompt_logprobs, token_logprobs


def test_token_logprobs_are_log_softmax_with_sorted_top_k() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 0.0, math.log(5.0)]])
    out = token_logprobs(logits, [2, 3], [2, 0])
    norm0 = math.log(math.e + math.e**3 + math.e**2 + 1.0)
    assert out[0].token_id == 2
    assert out[0].logprob == pytest.approx(2.0 - norm0, abs=1e-6)
    assert [t for t, _ in out[0].top] == [1, 2]
    assert out[0].top[0][1] == pytest.approx(3.0 - norm0, abs=1e-6)
    assert out[1].logprob == pytest.approx(math.log(5.0 / 8.0), abs=1e-6)
    assert out[1].top == ()


def test_token_logprobs_use_fp32_for_low_precision_logits() -> None:
    logits = torch.randn(3, 50).to(torch.bfloat16)
    out = token_logprobs(logits, [0, 1, 2], [1, 1, 1])
    ref = torch.log_softmax(logits.float(), dim=-1)
    assert [lp.logprob for lp in out] == pytest.approx([ref[i, i].item() for i in range(3)])


def test_prompt_logprobs_span_several_passes() -> None:
    rows = PROMPT_ROWS_PER_PASS + 7
    hidden = torch.randn(rows, 8)
    weight = torch.randn(11, 8)
    targets = torch.randint(0, 11, (rows,)).tolist()
    out = prompt_logprobs(hidden, targets, lambda h: h @ weight.T)
    ref = torch.log_softmax(hidden @ weight.T, dim=-1)
    assert len(out) == rows
    assert [lp.logprob for lp in out] == pytest.approx(
        [ref[i, t].item() for i, t in enumerate(targets)], abs=1e-5
    )


@pytest.mark.parametrize("bad", [-1, 21, 2.5, True, "3"])
def test_sampling_params_reject_bad_logprobs(bad: object) -> None:
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=bad)  # type: ignore[arg-type]


def test_sampling_params_logprob_defaults_and_bounds() -> None:
    p = SamplingParams()
    assert (p.logprobs, p.prompt_logprobs, p.speculative) == (None, False, None)
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(logprobs=20, prompt_logprobs=True, speculative=False).speculative is False
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="speculative"):
        SamplingParams(speculative=0)  # type: ignore[arg-type]
