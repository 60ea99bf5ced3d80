"""The engine benchmark's workloads: seeded prompts that never hit a prefix cache.

``batch1`` is one request at a time (a 128-token prompt, 64 new tokens, repeated; each
repeat also times a 1-token run on another prompt for TTFT); ``mixed`` is 32 requests
submitted together with prompt and output lengths drawn from :class:`Plan`'s ranges;
``decode`` is 64 requests of a 64-token prompt and 128 new tokens (decode-heavy).

Workloads cross a process boundary (each system runs in its own process, see
``benchmarks.engine.child``): :meth:`Workload.to_json` / :meth:`Workload.from_json`.
Stdlib only at import time: the peer's venv imports this module too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Request:
    prompt: tuple[int, ...]
    max_new_tokens: int


@dataclass(frozen=True, slots=True)
class Workload:
    """Rounds of requests; each round is submitted at once and timed on its own (median)."""

    name: str
    rounds: tuple[tuple[Request, ...], ...]
    ttft_prompts: tuple[tuple[int, ...], ...] = ()  # per round: a 1-token run before it

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rounds": [[[list(r.prompt), r.max_new_tokens] for r in rnd] for rnd in self.rounds],
            "ttft_prompts": [list(p) for p in self.ttft_prompts],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Workload:
        return cls(
            name=data["name"],
            rounds=tuple(
                tuple(Request(tuple(p), int(n)) for p, n in rnd) for rnd in data["rounds"]
            ),
            ttft_prompts=tuple(tuple(p) for p in data["ttft_prompts"]),
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """Sizes of one benchmark run; ``quick`` shrinks everything for a smoke test."""

    batch1_prompt: int = 128
    batch1_new: int = 64
    batch1_repeats: int = 3
    mixed_requests: int = 32
    mixed_prompt: tuple[int, int] = (32, 512)
    mixed_new: tuple[int, int] = (16, 128)
    decode_requests: int = 64
    decode_prompt: int = 64
    decode_new: int = 128
    static_batch_size: int = 8
    bandwidth_mib: int = 512

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            batch1_new=16,
            batch1_repeats=2,
            mixed_requests=8,
            mixed_prompt=(32, 128),
            mixed_new=(8, 32),
            decode_requests=8,
            decode_prompt=32,
            decode_new=32,
            static_batch_size=4,
            bandwidth_mib=256,
        )


class TokenSampler:
    """Seeded random prompts over the vocabulary, never producing special tokens."""

    def __init__(self, vocab_size: int, excluded: set[int], seed: int) -> None:
        self.allowed = [t for t in range(vocab_size) if t not in excluded]
        self.rng = random.Random(seed)

    def prompt(self, length: int) -> tuple[int, ...]:
        return tuple(self.rng.choice(self.allowed) for _ in range(length))

    def between(self, bounds: tuple[int, int]) -> int:
        return self.rng.randint(*bounds)


def build_workloads(plan: Plan, sampler: TokenSampler) -> list[Workload]:
    batch1 = Workload(
        name="batch1",
        rounds=tuple(
            (Request(sampler.prompt(plan.batch1_prompt), plan.batch1_new),)
            for _ in range(plan.batch1_repeats)
        ),
        ttft_prompts=tuple(sampler.prompt(plan.batch1_prompt) for _ in range(plan.batch1_repeats)),
    )
    mixed = Workload(
        name="mixed",
        rounds=(
            tuple(
                Request(
                    sampler.prompt(sampler.between(plan.mixed_prompt)),
                    sampler.between(plan.mixed_new),
                )
                for _ in range(plan.mixed_requests)
            ),
        ),
    )
    decode = Workload(
        name="decode",
        rounds=(
            tuple(
                Request(sampler.prompt(plan.decode_prompt), plan.decode_new)
                for _ in range(plan.decode_requests)
            ),
        ),
    )
    return [batch1, mixed, decode]


def warmup_rounds(plan: Plan, sampler: TokenSampler) -> list[list[Request]]:
    """Untimed rounds shaped like the workloads: first calls pay one-off kernel set-up."""
    return [
        [Request(sampler.prompt(plan.batch1_prompt), 4)],
        [Request(sampler.prompt(n), 4) for n in (plan.mixed_prompt[1], plan.mixed_prompt[0])],
        [Request(sampler.prompt(plan.decode_prompt), 4) for _ in range(8)],
    ]


def make_sampler(path: Path, seed: int) -> TokenSampler:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    vocab = min(AutoConfig.from_pretrained(path).vocab_size, len(tokenizer))
    return TokenSampler(vocab, excluded, seed)
