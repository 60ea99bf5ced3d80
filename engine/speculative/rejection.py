"""The accept/resample rule of speculative sampling (Leviathan et al., Chen et al.).

Given target probabilities ``p`` at each of the k drafted positions plus one more, and the
draft's proposal probabilities ``q``, draft token ``d_i`` is accepted with probability
``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection a token is drawn from
``norm(max(0, p_i - q_i))`` and the rest is dropped; if all k are accepted a bonus token is
drawn from ``p_k``. The output is distributed exactly as sampling from ``p`` one token at a
time. For a deterministic proposer (n-gram) ``q_i`` is one-hot at ``d_i``: accept with
probability ``p_i(d_i)``, else draw from ``p_i`` with ``d_i`` removed.

Greedy is the limit: accept while the target's argmax equals the draft, then emit the
argmax — token-for-token what plain greedy decoding produces.
"""

from __future__ import annotations

import torch


def verify_greedy(target_argmax: list[int], draft: list[int]) -> list[int]:
    """Accepted drafts plus the target's next token; ``target_argmax`` has len(draft) + 1."""
    out: list[int] = []
    for i, token in enumerate(draft):
        if target_argmax[i] != token:
            break
        out.append(token)
    out.append(target_argmax[len(out)])
    return out


def rejection_sample(
    target_probs: torch.Tensor,
    draft: list[int],
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None,
) -> list[int]:
    """Accepted drafts plus one resampled or bonus token.

    ``target_probs`` is (len(draft) + 1, vocab); ``draft_probs`` is (len(draft), vocab), or
    None for a one-hot proposal (n-gram). Draws use ``generator`` in a fixed order (one
    uniform per examined draft, then one categorical), so a seeded request is reproducible.
    """
    if target_probs.shape[0] != len(draft) + 1:
        raise ValueError(f"need {len(draft) + 1} target rows, got {target_probs.shape[0]}")
    out: list[int] = []
    for i, token in enumerate(draft):
        p = target_probs[i]
        q_token = 1.0 if draft_probs is None else float(draft_probs[i, token])
        u = float(torch.rand((), generator=generator))
        if q_token > 0 and u < float(p[token]) / q_token:  # min(1, p/q) via u < p/q
            out.append(token)
            continue
        out.append(
            _draw(_residual(p, token, None if draft_probs is None else draft_probs[i]), generator)
        )
        return out
    out.append(_draw(target_probs[len(draft)], generator))
    return out


def _residual(p: torch.Tensor, token: int, q: torch.Tensor | None) -> torch.Tensor:
    """norm(max(0, p - q)); q = one-hot(token) when None. Falls back to p if it is empty."""
    if q is None:
        residual = p.clone()
        residual[token] = 0.0
    else:
        residual = (p - q).clamp_min(0.0)
    total = float(residual.sum())
    return p if total <= 0 else residual / total


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))
