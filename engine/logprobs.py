"""Log-probabilities of sampled and prompt tokens, from the logits the sampler sees.

They are the raw model's: ``log_softmax`` of the logits in fp32, before temperature,
top-k or top-p (what vLLM returns by default), so they do not depend on how a token was
picked. The model runner calls these on the rows that asked; nothing here touches the KV.
"""

from __future__ import annotations

import torch

from engine.outputs import TokenLogprob

# Rows of prompt logits turned into log-probs at a time: bounds the (rows, vocab) fp32
# temporaries for long prompts.
PROMPT_ROWS_PER_PASS = 256


def token_logprobs(logits: torch.Tensor, token_ids: list[int], ks: list[int]) -> list[TokenLogprob]:
    """Per row of ``logits (rows, vocab)``: the log-prob of ``token_ids[row]`` and the
    ``ks[row]`` most likely tokens with theirs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(token_ids, device=logp.device).view(-1, 1))
    chosen_list = chosen.view(-1).tolist()
    kmax = max(ks, default=0)
    top_values: list[list[float]] = [[] for _ in ks]
    top_ids: list[list[int]] = [[] for _ in ks]
    if kmax > 0:
        values, ids = torch.topk(logp, kmax, dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    return [
        TokenLogprob(
            token_id=int(tok),
            logprob=lp,
            top=tuple(zip(top_ids[row][:k], top_values[row][:k], strict=True)),
        )
        for row, (tok, lp, k) in enumerate(zip(token_ids, chosen_list, ks, strict=True))
    ]


def prompt_logprobs(
    hidden: torch.Tensor, targets: list[int], compute_logits: object
) -> list[TokenLogprob]:
    """Log-prob of ``targets[i]`` given the position whose final hidden state is
    ``hidden[i]``; logits are computed ``PROMPT_ROWS_PER_PASS`` rows at a time."""
    out: list[TokenLogprob] = []
    for start in range(0, len(targets), PROMPT_ROWS_PER_PASS):
        rows = hidden[start : start + PROMPT_ROWS_PER_PASS]
        part = targets[start : start + PROMPT_ROWS_PER_PASS]
        logits = compute_logits(rows)  # type: ignore[operator]
        out.extend(token_logprobs(logits, part, [0] * len(part)))
    return out
