"""A back-of-the-envelope replica count for a traffic: where the planner's search starts.

Fluid (average-rate) arithmetic over the cost model, no queueing: the simulator decides;
this only saves it the probes far from the answer (a guess within k of the answer costs
O(log k) simulations). At the traffic's peak rate:

- prefill: prompt tokens to compute per second (the shared prefix counted once per group,
  cached) over one replica's throughput at its batch budget, at ``utilisation``;
- decode: the largest batch whose step time fits the TPOT target (and whose context fits
  the KV cache) sets one replica's token rate; decode tokens per second over it;
- colocated: the two added (one worker does both jobs).
"""

from __future__ import annotations

import math
import random
import statistics

from capacity.cost_model import CostModel
from capacity.plan_types import Guess, Slo
from capacity.traffic import Traffic

_SAMPLES = 2000


def mean_lengths(traffic: Traffic) -> tuple[float, float]:
    """Mean prompt and output tokens (sampled from the clamped distributions)."""
    rng = random.Random(traffic.seed)
    draw_in, draw_out = traffic.input_tokens.sampler(rng), traffic.output_tokens.sampler(rng)
    prompt = statistics.fmean(draw_in() for _ in range(_SAMPLES))
    output = statistics.fmean(draw_out() for _ in range(_SAMPLES))
    return prompt, output


def estimate(
    traffic: Traffic,
    slo: Slo,
    cost: CostModel,
    *,
    budget: int | None = None,
    max_seqs: int | None = None,
    utilisation: float = 0.85,
) -> Guess:
    """Replica counts that should roughly meet ``slo`` at ``traffic``'s peak.

    ``budget`` (prefill tokens per step) and ``max_seqs`` (decode batch cap) default to the
    profile's engine options."""
    engine = cost.profile.engine
    budget = budget or int(engine.get("max_num_batched_tokens", 8192))
    max_seqs = max_seqs or int(engine.get("max_num_seqs", 256))
    rate = traffic.rate.peak()
    prompt, output = mean_lengths(traffic)
    share = traffic.prefix
    cached = share.fraction * share.shared_tokens if share.groups else 0.0
    prefill_tok_s = budget / max(cost.prefill_s(budget, 0), 1e-9)
    prefill = rate * max(prompt - cached, 1.0) / (prefill_tok_s * utilisation)
    batch = _decode_batch(cost, slo, prompt + output / 2, max_seqs)
    context = batch * (prompt + output / 2)
    decode_tok_s = batch / max(cost.decode_step_s(batch, int(context)), 1e-9)
    decode = rate * output / (decode_tok_s * utilisation)
    p, d = max(1, math.ceil(prefill)), max(1, math.ceil(decode))
    return Guess(prefill=p, decode=d, colocated=max(1, math.ceil(prefill + decode)))


def _decode_batch(cost: CostModel, slo: Slo, context: float, max_seqs: int) -> int:
    """The largest batch (<= max_seqs, KV permitting) whose step fits 0.8 × the TPOT."""
    kv_limit = max(1, int(cost.profile.kv_capacity_tokens / max(context, 1.0)))
    best = 1
    for batch in range(1, min(max_seqs, kv_limit) + 1):
        if cost.decode_step_s(batch, int(batch * context)) > 0.8 * slo.tpot_s:
            break
        best = batch
    return best
