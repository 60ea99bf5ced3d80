"""Conditional disaggregation: prefill a request remotely or on its decode worker.

A disaggregated pool sends every prompt to a prefill worker by default ("always remote").
That costs short and already-cached prompts a queue wait, a second RPC and a KV transfer
for little compute, while the decode worker could prefill them in its next step. With
``conditional`` thresholds on the pool (:class:`DisaggThresholds`, YAML), the router asks
:func:`decide_prefill` once per attempt, after the policy picked both workers:

    local = decode_running < max_decode_running_for_local
            and (local_uncached <= local_max_uncached_tokens
                 or (prefill_queue_tokens > local_when_prefill_queue_tokens_over
                     and local_uncached <= prefill_queue_tokens))

``local_uncached`` is what the decode worker would compute (the prompt less the prefix
the router's index says it holds: decode workers publish their KV events too, and a
remote prefill lands its blocks in the decode worker's prefix cache), ``prefill_queue_tokens``
the prompt tokens already waiting on the chosen prefill worker, ``decode_running`` the
decode worker's requests (running and queued). The second branch sends a prompt home when
the prefill pool is backed up and computing it here is cheaper than waiting behind that
queue. A busy decode worker always hands off: its running streams would pay the prefill in
inter-token latency, which is what disaggregation exists to protect.

Pure: numbers in, a :class:`PrefillChoice` out; unit-tested without workers.
"""

from __future__ import annotations

from dataclasses import dataclass

REMOTE = "remote"
LOCAL = "local"


@dataclass(frozen=True, slots=True)
class DisaggThresholds:
    """A pool's ``conditional:`` section. ``enabled: false`` = always remote."""

    enabled: bool = True
    # Prompts with at most this many tokens left to compute on the decode worker stay there.
    local_max_uncached_tokens: int = 256
    # A prefill worker with more prompt tokens than this queued: prefill here instead, when
    # what is left to compute here is no more than that queue.
    local_when_prefill_queue_tokens_over: int = 4096
    # A decode worker with this many requests (running + queued) or more never prefills.
    max_decode_running_for_local: int = 32

    def __post_init__(self) -> None:
        for name in (
            "local_max_uncached_tokens",
            "local_when_prefill_queue_tokens_over",
            "max_decode_running_for_local",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"conditional.{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.enabled, bool):
            raise ValueError(f"conditional.enabled must be true or false, got {self.enabled!r}")


@dataclass(frozen=True, slots=True)
class PrefillInputs:
    """What the decision reads, all in prompt tokens except ``decode_running``."""

    num_tokens: int  # the prompt
    prefill_cached: int  # held by the chosen prefill worker (prefix index)
    decode_cached: int  # held by the chosen decode worker (prefix index)
    prefill_queue_tokens: int  # prompt tokens queued on the chosen prefill worker
    decode_running: int  # requests running or queued on the chosen decode worker

    @property
    def local_uncached(self) -> int:
        return self.num_tokens - self.decode_cached

    @property
    def remote_uncached(self) -> int:
        return self.num_tokens - self.prefill_cached


@dataclass(frozen=True, slots=True)
class PrefillChoice:
    remote: bool
    reason: str  # a metric label: disabled | decode_busy | short | cached | prefill_queue | long

    @property
    def mode(self) -> str:
        return REMOTE if self.remote else LOCAL


def decide_prefill(t: DisaggThresholds, x: PrefillInputs) -> PrefillChoice:
    """Remote or local for one request; see the module docstring for the rule."""
    if not t.enabled:
        return PrefillChoice(True, "disabled")
    if x.decode_running >= t.max_decode_running_for_local:
        return PrefillChoice(True, "decode_busy")
    if x.local_uncached <= t.local_max_uncached_tokens:
        # "cached": short only thanks to the decode worker's prefix cache.
        short = x.num_tokens <= t.local_max_uncached_tokens
        return PrefillChoice(False, "short" if short else "cached")
    queued = x.prefill_queue_tokens
    if queued > t.local_when_prefill_queue_tokens_over and x.local_uncached <= queued:
        return PrefillChoice(False, "prefill_queue")
    return PrefillChoice(True, "long")
