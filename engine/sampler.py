"""Turn a step's logits into next tokens: greedy, temperature, top-k, top-p, seeds.

Greedy rows take the argmax in one batched call. Sampled rows are filtered per row (their
parameters differ) and drawn from a per-request ``torch.Generator`` when the request has
a seed, so its samples do not depend on what else shares the batch. Log-probs of the
picked tokens (``SamplingParams.logprobs``) come from the same logits, before any of this
filtering: engine/logprobs.py, called by the model runner after ``sample``.
"""

from __future__ import annotations

import torch

from common.sampling import SamplingParams


class Sampler:
    def __init__(self, seed: int) -> None:
        self._shared = torch.Generator().manual_seed(seed)
        self._seeded: dict[str, torch.Generator] = {}

    def sample(
        self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]
    ) -> list[int]:
        """One token per row of ``logits (rows, vocab)``; rows follow ``request_ids``."""
        tokens = logits.argmax(dim=-1).tolist()
        for row, (request_id, p) in enumerate(zip(request_ids, params, strict=True)):
            if not p.greedy:
                tokens[row] = self._sample_row(logits[row], request_id, p)
        return tokens

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator."""
        self._seeded.pop(request_id, None)

    def _sample_row(self, logits: torch.Tensor, request_id: str, p: SamplingParams) -> int:
        probs = filtered_probs(logits.float().cpu(), p)
        return int(torch.multinomial(probs, 1, generator=self.generator(request_id, p)))

    def generator(self, request_id: str, p: SamplingParams) -> torch.Generator:
        """The random stream a request's draws come from: its own when it has a seed (so
        speculative verification continues the same stream), else the shared one."""
        if p.seed is None:
            return self._shared
        if request_id not in self._seeded:
            self._seeded[request_id] = torch.Generator().manual_seed(p.seed)
        return self._seeded[request_id]


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Softmax of ``logits / temperature`` restricted to the top-k and the top-p nucleus."""
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum()
    return probs
