"""Score a step's verify chunks: one logits call over all their rows, then the
accept/resample rule per chunk (:mod:`engine.speculative.rejection`).

A verify chunk computes positions [start, start + 1 + k) of a running sequence: its last
known token and k drafts. Row ``i`` of the chunk predicts the token after input ``i``, so
rows 0..k-1 judge drafts 0..k-1 and row k gives the bonus token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.sampler import Sampler, filtered_probs
from engine.scheduler import ScheduledChunk
from engine.speculative.rejection import rejection_sample, verify_greedy


def verify_chunks(
    chunks: list[tuple[ScheduledChunk, int]],
    hidden: torch.Tensor,
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    sampler: Sampler,
) -> dict[str, list[int]]:
    """{request id: accepted drafts + one target token} for ``(chunk, first row)`` pairs."""
    if not chunks:
        return {}
    rows = torch.cat(
        [torch.arange(first, first + c.num_tokens, device=hidden.device) for c, first in chunks]
    )
    logits = compute_logits(hidden[rows])
    argmax = logits.argmax(dim=-1).tolist()
    out: dict[str, list[int]] = {}
    offset = 0
    for chunk, _ in chunks:
        n = chunk.num_tokens
        seq = chunk.seq
        if seq.params.greedy:
            out[seq.request_id] = verify_greedy(argmax[offset : offset + n], chunk.draft_token_ids)
        else:
            chunk_logits = logits[offset : offset + n].float().cpu()
            probs = torch.stack([filtered_probs(row, seq.params) for row in chunk_logits])
            generator = sampler.generator(seq.request_id, seq.params)  # its seeded stream
            out[seq.request_id] = rejection_sample(probs, chunk.draft_token_ids, None, generator)
        offset += n
    return out
