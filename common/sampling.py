"""Per-request sampling parameters, validated on construction.

Torch-free: the engine samples with them, and they cross the router → decode and
decode → prefill boundaries (see :mod:`messages`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature == 0`` means greedy. ``top_k == 0`` disables top-k; ``top_p == 1``
    disables nucleus sampling. A ``seed`` makes a request's samples reproducible
    regardless of what else is in the batch.

    ``logprobs=k`` (0..20; None = off) returns, per generated token, its log-prob and the
    ``k`` most likely alternatives; ``prompt_logprobs`` returns the log-prob of each prompt
    token after the first given the tokens before it (such a request skips the prefix
    cache so every prompt position is computed). Log-probs are those of the raw model
    (log-softmax of the logits before temperature, top-k or top-p), as vLLM returns them.
    ``speculative`` = None follows the worker's speculative-decoding default; False opts
    this request out.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: bool = False
    speculative: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables), got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        _check_logprobs(self.logprobs)
        if not isinstance(self.prompt_logprobs, bool):
            raise ValueError(f"prompt_logprobs must be a bool, got {self.prompt_logprobs!r}")
        if self.speculative is not None and not isinstance(self.speculative, bool):
            raise ValueError(f"speculative must be a bool or None, got {self.speculative!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


MAX_LOGPROBS = 20  # the most top alternatives a request may ask for (OpenAI's limit)


def _check_logprobs(value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
        raise ValueError(
            f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {value!r}"
        )
