"""Speculative decoding on the decode side: propose k tokens cheaply, verify them in one
target forward pass (a "verify chunk" of 1 + k tokens over the paged KV cache), keep the
accepted prefix plus one target token, roll the rest back.

- :mod:`engine.speculative.ngram`: prompt-lookup proposals from the request's own tokens.
- :mod:`engine.speculative.draft`: greedy proposals from a draft model on its own paged KV
  cache, kept in sync with the accepted tokens (:mod:`engine.speculative.draft_load` loads
  and checks the draft: same vocabulary and tokenizer as the target).
- :mod:`engine.speculative.rejection`: the accept/resample rule (greedy and sampled).
- :mod:`engine.speculative.tracker`: acceptance counters, the per-request draft length
  (adaptive k) and the per-request fallback (pause, then probe again).
- :mod:`engine.speculative.speculator`: which sequence speculates this step, how far.
- :mod:`engine.speculative.verify`: scoring verify chunks inside the model runner.
"""

from engine.speculative.speculator import Speculator
from engine.speculative.tracker import AcceptanceTracker, SpeculativeStats

__all__ = ["AcceptanceTracker", "SpeculativeStats", "Speculator"]
