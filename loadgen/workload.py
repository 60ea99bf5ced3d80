"""Workloads: seeded, synthetic sessions of chat turns that any target can replay.

A workload is a list of :class:`Session`. A session is one or more :class:`Turn` played in
order: a single-shot request is a one-turn session; a multi-turn chat sends turn k with the
whole conversation so far (every earlier user turn and the reply the server actually
gave), so each turn extends the previous prompt. Text is generated from a fixed word list
and cut to a token count with the model's tokenizer, so lengths hold for the model served.

Kinds (``WorkloadSpec.kind``):

    fixed          every request: ``input_tokens`` in, ``output_tokens`` out
    sharegpt       ShareGPT-like lengths: log-normal input and output, clipped
    shared_prefix  ``groups`` × ``prompts_per_group``; a group shares a long system prompt
                   (``prefix_tokens``), each prompt adds its own question; groups interleave
    multi_turn     ``conversations`` × ``turns``; each turn adds a user message
    mixed_long     short chats with a long prompt (``long_tokens``) every ``long_every`` requests
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

WORKLOAD_KINDS = ("fixed", "sharegpt", "shared_prefix", "multi_turn", "mixed_long")

_PROSE = (
    "the system routes each request to a worker that holds its prefix so the cache stays "
    "warm latency matters more than raw throughput for chat while batch jobs want tokens "
    "per second a scheduler picks which sequences run in the next step under a fixed token "
    "budget memory for attention keys and values is paged in blocks of sixteen tokens each "
    "operators tune autoscaling from queue depth and time to first token percentiles "
    "please summarise the report explain the trade offs list three risks and suggest a plan "
    "river mountain coffee garden window planet violin harbor lantern meadow orbit pepper "
    "quartz saddle timber velvet walnut yonder zephyr amber breeze candle desert ember forest"
)
_WORDS = tuple(_PROSE.split())


@dataclass(frozen=True, slots=True)
class Turn:
    user: str  # this turn's user message
    max_tokens: int
    input_tokens: int  # length of ``user`` in tokens (before the chat template)


@dataclass(frozen=True, slots=True)
class Session:
    """Turns sent one after another; ``system`` (may be empty) opens every prompt."""

    session_id: str
    turns: tuple[Turn, ...]
    system: str = ""
    group: str = ""  # shared_prefix group, multi_turn conversation, or the request's class

    @property
    def num_requests(self) -> int:
        return len(self.turns)

    def messages(self, turn: int, replies: Sequence[str]) -> list[dict[str, str]]:
        """The chat messages of ``turn``: system, then each earlier user turn followed by
        the reply the server gave to it (``replies[i]``), then this turn's user message."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for earlier, reply in zip(self.turns[:turn], replies, strict=True):
            messages.append({"role": "user", "content": earlier.user})
            messages.append({"role": "assistant", "content": reply})
        messages.append({"role": "user", "content": self.turns[turn].user})
        return messages


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """Every knob of every kind; each kind reads its own. Defaults suit a 2-core CPU box."""

    kind: str = "sharegpt"
    num_requests: int = 32  # fixed / sharegpt / mixed_long: requests
    seed: int = 0
    input_tokens: int = 128  # fixed
    output_tokens: int = 32  # fixed, shared_prefix, multi_turn, mixed_long (short ones)
    # sharegpt: log-normal medians and spreads, clipped to [min, max]
    input_median: int = 160
    output_median: int = 48
    sigma: float = 0.8
    min_tokens: int = 8
    max_input_tokens: int = 1024
    max_output_tokens: int = 192
    # shared_prefix
    groups: int = 4
    prompts_per_group: int = 8
    prefix_tokens: int = 512
    question_tokens: int = 32
    # multi_turn
    conversations: int = 4
    turns: int = 4
    turn_tokens: int = 64
    # mixed_long
    short_tokens: int = 96
    long_tokens: int = 1536
    long_every: int = 6
    long_output_tokens: int = 16
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, kept in the report

    def __post_init__(self) -> None:
        if self.kind not in WORKLOAD_KINDS:
            raise ValueError(f"unknown workload {self.kind!r}; one of {', '.join(WORKLOAD_KINDS)}")
        for name in ("num_requests", "groups", "prompts_per_group", "conversations", "turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    def with_overrides(self, **values: Any) -> WorkloadSpec:
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    @property
    def total_requests(self) -> int:
        if self.kind == "shared_prefix":
            return self.groups * self.prompts_per_group
        if self.kind == "multi_turn":
            return self.conversations * self.turns
        return self.num_requests


class TextFactory:
    """Random word text cut to an exact token count with ``encode`` / ``decode``."""

    def __init__(
        self, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str]
    ) -> None:
        self._encode = encode
        self._decode = decode

    def text(self, num_tokens: int, rng: random.Random, lead: str = "") -> str:
        words = [lead] if lead else []
        # ~1.3 tokens per word for this word list; overshoot, then cut
        words += rng.choices(_WORDS, k=max(4, int(num_tokens * 1.2) + 4))
        ids = self._encode(" ".join(words))
        while len(ids) < num_tokens:
            ids += self._encode(" " + " ".join(rng.choices(_WORDS, k=num_tokens)))
        return self._decode(ids[:num_tokens]).strip()


def build(spec: WorkloadSpec, text: TextFactory) -> list[Session]:
    """The sessions of ``spec``, identical for the same spec and tokenizer."""
    rng = random.Random(spec.seed)
    return _BUILDERS[spec.kind](spec, text, rng)


def _single(index: int, user: str, tokens: int, max_tokens: int, group: str) -> Session:
    return Session(f"r{index:05d}", (Turn(user, max_tokens, tokens),), group=group)


def _fixed(spec: WorkloadSpec, text: TextFactory, rng: random.Random) -> list[Session]:
    return [
        _single(i, text.text(spec.input_tokens, rng, f"#{i}"), spec.input_tokens,
                spec.output_tokens, "fixed")
        for i in range(spec.num_requests)
    ]  # fmt: skip


def lognormal_length(rng: random.Random, median: int, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, round(median * math.exp(rng.gauss(0.0, sigma))))))


def _sharegpt(spec: WorkloadSpec, text: TextFactory, rng: random.Random) -> list[Session]:
    sessions = []
    for i in range(spec.num_requests):
        n_in = lognormal_length(
            rng, spec.input_median, spec.sigma, spec.min_tokens, spec.max_input_tokens
        )
        n_out = lognormal_length(
            rng, spec.output_median, spec.sigma, spec.min_tokens, spec.max_output_tokens
        )
        sessions.append(_single(i, text.text(n_in, rng, f"#{i}"), n_in, n_out, "sharegpt"))
    return sessions


def _shared_prefix(spec: WorkloadSpec, text: TextFactory, rng: random.Random) -> list[Session]:
    systems = [
        text.text(spec.prefix_tokens, rng, f"You are assistant {g}.") for g in range(spec.groups)
    ]
    order = [(g, p) for g in range(spec.groups) for p in range(spec.prompts_per_group)]
    rng.shuffle(order)  # groups interleave, as independent users of each would
    sessions = []
    for i, (g, p) in enumerate(order):
        question = text.text(spec.question_tokens, rng, f"Q{p}:")
        turn = Turn(question, spec.output_tokens, spec.question_tokens)
        sessions.append(Session(f"r{i:05d}", (turn,), system=systems[g], group=f"g{g}"))
    return sessions


def _multi_turn(spec: WorkloadSpec, text: TextFactory, rng: random.Random) -> list[Session]:
    sessions = []
    for c in range(spec.conversations):
        turns = tuple(
            Turn(text.text(spec.turn_tokens, rng, f"Turn {t}:"), spec.output_tokens,
                 spec.turn_tokens)
            for t in range(spec.turns)
        )  # fmt: skip
        sessions.append(Session(f"c{c:04d}", turns, group=f"c{c}"))
    return sessions


def _mixed_long(spec: WorkloadSpec, text: TextFactory, rng: random.Random) -> list[Session]:
    sessions = []
    for i in range(spec.num_requests):
        if spec.long_every and i % spec.long_every == spec.long_every // 2:
            n_in, n_out, group = spec.long_tokens, spec.long_output_tokens, "long"
        else:
            n_in, n_out, group = spec.short_tokens, spec.output_tokens, "short"
        sessions.append(_single(i, text.text(n_in, rng, f"#{i}"), n_in, n_out, group))
    return sessions


_BUILDERS: dict[str, Callable[[WorkloadSpec, TextFactory, random.Random], list[Session]]] = {
    "fixed": _fixed,
    "sharegpt": _sharegpt,
    "shared_prefix": _shared_prefix,
    "multi_turn": _multi_turn,
    "mixed_long": _mixed_long,
}
