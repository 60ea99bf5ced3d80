"""Log-probabilities as they cross every boundary (engine outputs, worker and public RPCs).

Torch-free, like the rest of :mod:`common`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token's log-prob under the raw model, with the most likely alternatives.

    ``top`` holds ``(token_id, logprob)`` pairs, most likely first (``k`` of them for
    ``SamplingParams(logprobs=k)``; empty for prompt tokens).
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
