"""Summaries of a run: latency distributions, throughput, goodput under SLOs, hit ratio.

Every number is computed at the client from :class:`RequestRecord`. Latencies are in
milliseconds. Goodput counts only requests that finished *and* met the SLO (TTFT, TPOT
and, when set, the longest ITL gap), per second of the run. The prefix-cache hit ratio is
Σ cached / Σ prompt tokens over the requests whose server reported ``cached_tokens``.
``groups`` splits TTFT / ITL / E2E by the workload's request group (``mixed_long``: short
chats vs long prompts); ``itl_gaps_over`` counts the stalls a user notices.
Refusals (RESOURCE_EXHAUSTED / HTTP 429, see :mod:`record`) are neither completed nor
failed: ``refused`` counts them, ``refusal_ms`` is how fast they came back, and
``admitted`` = requests - refused is what the latency figures describe.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from loadgen.record import RequestRecord

STALL_THRESHOLDS_MS = (500, 2000)  # ITL gaps longer than these are counted as stalls


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


@dataclass(frozen=True, slots=True)
class Slo:
    """A request is good if it finished with TTFT, TPOT and (if set) every ITL gap in bound.

    The TTFT bound may grow with the prompt (``ttft_ms_per_1k_tokens``): a 1.5k-token
    prompt cannot be prefilled as fast as a chat turn, and one flat bound would make every
    long request fail whatever the system does.
    """

    ttft_ms: float = 2000.0
    tpot_ms: float = 200.0
    max_itl_ms: float | None = None  # a tight ITL SLO: no gap between chunks longer than this
    ttft_ms_per_1k_tokens: float = 0.0  # TTFT allowance per 1000 prompt tokens

    def ttft_bound_ms(self, prompt_tokens: int) -> float:
        return self.ttft_ms + self.ttft_ms_per_1k_tokens * prompt_tokens / 1000

    def met_by(self, record: RequestRecord) -> bool:
        if not record.ok or record.ttft_s is None:
            return False
        tpot = record.tpot_s
        gaps = record.itls_s
        return (
            record.ttft_s * 1e3 <= self.ttft_bound_ms(record.prompt_tokens)
            and (tpot is None or tpot * 1e3 <= self.tpot_ms)
            and (self.max_itl_ms is None or not gaps or max(gaps) * 1e3 <= self.max_itl_ms)
        )

    def describe(self) -> str:
        per_token = (
            f" + {self.ttft_ms_per_1k_tokens:g} ms per 1k prompt tokens"
            if self.ttft_ms_per_1k_tokens
            else ""
        )
        itl = f", every ITL <= {self.max_itl_ms:g} ms" if self.max_itl_ms is not None else ""
        return f"TTFT <= {self.ttft_ms:g} ms{per_token}, TPOT <= {self.tpot_ms:g} ms{itl}"


def distribution(values: Iterable[float], scale: float = 1e3) -> dict[str, float | int | None]:
    """n, mean, p50, p90, p99 and max of ``values`` × ``scale`` (seconds → ms by default)."""
    data = [v * scale for v in values]
    if not data:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    return {
        "n": len(data),
        "mean": round(sum(data) / len(data), 3),
        "p50": round(percentile(data, 50), 3),
        "p90": round(percentile(data, 90), 3),
        "p99": round(percentile(data, 99), 3),
        "max": round(max(data), 3),
    }


def hit_ratio(records: Sequence[RequestRecord]) -> float | None:
    reported = [r for r in records if r.ok and r.cached_tokens is not None and r.prompt_tokens]
    prompt = sum(r.prompt_tokens for r in reported)
    if not prompt:
        return None
    return sum(r.cached_tokens or 0 for r in reported) / prompt


def summarize(
    records: Sequence[RequestRecord], duration_s: float, slo: Slo, unsent: int = 0
) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    duration = max(duration_s, 1e-9)
    met = [r for r in ok if slo.met_by(r)]
    gaps_ms = [gap * 1e3 for r in ok for gap in r.itls_s]
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": sum(r.failed for r in records),
        "errors": dict(Counter(r.error or "NO_TOKENS" for r in records if r.failed)),
        "refused": sum(r.refused for r in records),
        "admitted": sum(not r.refused for r in records),
        "refusal_ms": distribution(r.refusal_s for r in records if r.refusal_s is not None),
        "retry_after_ms": distribution(
            r.retry_after_s for r in records if r.retry_after_s is not None
        ),
        "unsent": unsent,
        "duration_s": round(duration_s, 3),
        "ttft_ms": distribution(r.ttft_s for r in ok if r.ttft_s is not None),
        "itl_ms": distribution(gap for r in ok for gap in r.itls_s),
        "tpot_ms": distribution(r.tpot_s for r in ok if r.tpot_s is not None),
        "e2e_ms": distribution(r.e2e_s for r in ok if r.e2e_s is not None),
        "itl_gaps_over": {f">{t}ms": sum(g > t for g in gaps_ms) for t in STALL_THRESHOLDS_MS},
        "coalesced_chunks": sum(n > 1 for r in ok for n in r.chunk_tokens),
        "send_lag_ms": distribution(r.queue_delay_s for r in records if r.sent_s),
        "groups": group_latencies(ok),
        "throughput_req_s": round(len(ok) / duration, 4),
        "output_tok_s": round(sum(r.output_tokens for r in ok) / duration, 3),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens": sum(r.output_tokens for r in ok),
        "slo": asdict(slo),
        "slo_attainment": round(len(met) / len(records), 4) if records else None,
        "goodput_req_s": round(len(met) / duration, 4),
        "hit_ratio": _round(hit_ratio(records)),
    }


def group_latencies(ok: Sequence[RequestRecord]) -> dict[str, dict[str, Any]]:
    """TTFT, ITL and E2E of the completed requests of each workload group."""
    groups: dict[str, list[RequestRecord]] = {}
    for record in ok:
        groups.setdefault(record.group, []).append(record)
    return {
        name: {
            "ttft_ms": distribution(r.ttft_s for r in members if r.ttft_s is not None),
            "itl_ms": distribution(gap for r in members for gap in r.itls_s),
            "e2e_ms": distribution(r.e2e_s for r in members if r.e2e_s is not None),
        }
        for name, members in sorted(groups.items())
    }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)
