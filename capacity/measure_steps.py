"""Prefill and decode step times of the real engine, for a profile's two step grids.

Both are timed around ``LLMEngine.step()`` — schedule, model forward, sample, update —
which is what one replica's loop pays per step (the worker adds its RPC and KV-transfer
work on top; those are measured apart, capacity/measure_transfer.py and
capacity/measure_router.py). torch and the engine are imported by the caller's engine.

- prefill(new, cached): a warm-up request computes a ``cached``-token prefix; it finishes
  and its full blocks stay in the prefix cache. Then a request of that prefix plus ``new``
  fresh tokens (``max_tokens=1``) is prefilled in one step, a real prefix-cache hit: the
  step reports ``num_cached_tokens == cached`` (checked). ``new`` is capped at the step
  budget (``max_num_batched_tokens``): the scheduler chunks a longer prompt into several
  steps, and the simulator does the same.
- decode(batch, total_context): ``batch`` sequences of ``total_context // batch`` tokens
  each, prefilled, then timed decode steps of the full batch (each step adds one token per
  sequence). Sequences longer than a block share a cached prefix so that filling a point
  costs one prefix, not ``batch`` of them; attention still reads every sequence's whole
  context, so the step does the same work as ``batch`` distinct prompts.

Each point is repeated in rounds over the whole grid and its median kept.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from capacity.profile import Grid2D

Progress = Callable[[str], None]
TOKEN_RANGE = (100, 5000)  # ordinary vocabulary ids of the Llama-family tokenizers


@dataclass(frozen=True)
class StepGrid:
    """The axes to measure and how often to repeat each point."""

    new_tokens: tuple[int, ...]
    cached_tokens: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    total_contexts: tuple[int, ...]
    repeats: int = 3
    decode_steps: int = 5  # timed decode steps per point (after 2 warm-up steps)


def stderr_progress(line: str) -> None:
    """Default progress sink: one line on stderr."""
    print(f"[profile] {line}", file=sys.stderr, flush=True)


class StepTimer:
    """Times prefill and decode steps on one engine (built by the caller)."""

    def __init__(self, engine: Any, seed: int = 0) -> None:
        self.engine = engine
        self.rng = random.Random(seed)
        self.count = 0
        self.block_size = engine.config.block_size
        self.budget = engine.config.max_num_batched_tokens
        self.max_len = engine.max_model_len

    # -- helpers ---------------------------------------------------------------------------
    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(*TOKEN_RANGE) for _ in range(n)]

    def _add(self, tokens: list[int], max_tokens: int) -> str:
        from common.sampling import SamplingParams

        self.count += 1
        request_id = f"profile-{self.count}"
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.engine.add_request(request_id, tokens, params)
        return request_id

    def _drain(self) -> None:
        while self.engine.has_unfinished():
            self.engine.step()

    def warm_up(self) -> None:
        """A few steps before anything is timed (first forwards allocate and compile)."""
        for n in (self.block_size, min(128, self.budget)):
            self._add(self._tokens(n), max_tokens=4)
        self._drain()

    # -- prefill ---------------------------------------------------------------------------
    def prefill_sample(self, new_tokens: int, prefix: list[int]) -> float:
        """Seconds of one step prefilling ``new_tokens`` fresh tokens after ``prefix``."""
        if prefix:
            self.touch(prefix)  # cached now, whatever ran since
        self._add(prefix + self._tokens(new_tokens), max_tokens=1)
        start = time.perf_counter()
        outputs = self.engine.step()
        elapsed = time.perf_counter() - start
        if len(outputs) != 1 or outputs[0].cached_tokens != len(prefix):
            cached = outputs[0].cached_tokens if outputs else None
            raise RuntimeError(
                f"prefill point ({new_tokens}, {len(prefix)}): expected one request with "
                f"{len(prefix)} cached tokens in one step, got {cached}"
            )
        self._drain()
        return elapsed

    def touch(self, tokens: list[int]) -> None:
        """Run ``tokens`` as a prompt: computes what is not cached, refreshes what is."""
        self._add(tokens, max_tokens=1)  # the scheduler chunks it to the step budget
        self._drain()

    def prefill_grid(self, grid: StepGrid, progress: Progress) -> Grid2D:
        """The (new_tokens, cached_tokens) grid, in seconds per step.

        Repeats are rounds over the whole grid, not back-to-back samples, so a burst of
        other work on a shared machine spoils one sample of many points rather than every
        sample of one point; the median over rounds is kept."""
        xs = tuple(n for n in grid.new_tokens if n <= self.budget) or (self.budget,)
        ys = tuple(c for c in grid.cached_tokens if c % self.block_size == 0)
        ys = tuple(c for c in ys if c + xs[-1] < self.max_len) or (0,)
        prefixes = {c: self._tokens(c) for c in ys}
        samples: dict[tuple[int, int], list[float]] = {(n, c): [] for n in xs for c in ys}
        for round_ in range(grid.repeats):
            for (n, c), taken in samples.items():
                taken.append(self.prefill_sample(n, prefixes[c]))
            progress(f"prefill round {round_ + 1}/{grid.repeats}: {len(samples)} points")
        seconds = tuple(tuple(statistics.median(samples[n, c]) for c in ys) for n in xs)
        for c_index, c in enumerate(ys):
            values = ", ".join(
                f"{n} tok {row[c_index] * 1e3:.1f} ms" for n, row in zip(xs, seconds, strict=True)
            )
            progress(f"prefill cached={c}: {values}")
        return Grid2D("new_tokens", "cached_tokens", xs, ys, seconds)

    # -- decode ----------------------------------------------------------------------------
    def _decode_prompts(self, batch: int, per_seq: int) -> list[list[int]]:
        """``batch`` prompts of ``per_seq`` tokens; a shared (cached) prefix when long."""
        shared = ((per_seq - 1) // self.block_size) * self.block_size
        prefix = self._tokens(shared)
        return [prefix + self._tokens(per_seq - shared) for _ in range(batch)]

    def decode_sample(self, prompts: list[list[int]], steps: int) -> float:
        """Median seconds of ``steps`` decode steps of the batch of ``prompts``."""
        batch = len(prompts)
        if len(prompts[0]) > self.block_size:  # compute the shared prefix once
            self.touch(prompts[0])
        ids = [self._add(p, max_tokens=steps + 4) for p in prompts]
        prefilled: set[str] = set()
        while len(prefilled) < batch:  # every prompt prefilled (each has its first token)
            prefilled.update(out.request_id for out in self.engine.step())
        for _ in range(2):
            self.engine.step()
        samples = []
        for _ in range(steps):
            start = time.perf_counter()
            outputs = self.engine.step()
            samples.append(time.perf_counter() - start)
            if len(outputs) != batch:
                raise RuntimeError(f"decode point (batch {batch}): the batch split")
        for request_id in ids:
            self.engine.abort(request_id)
        return statistics.median(samples)

    def decode_grid(self, grid: StepGrid, progress: Progress) -> Grid2D:
        """The (batch_size, total_context) grid, in seconds per step (rounds, as above)."""
        cap = min(self.engine.config.max_num_seqs, self.budget)
        xs = tuple(b for b in grid.batch_sizes if b <= cap) or (1,)
        limit = self.max_len - grid.decode_steps - 8
        ys = tuple(t for t in grid.total_contexts if t // xs[0] <= limit and t >= 2 * xs[-1])
        if not ys:
            raise ValueError(f"decode grid: no total_context fits batches {xs} and {limit}")
        prompts = {(b, t): self._decode_prompts(b, max(t // b, 2)) for b in xs for t in ys}
        samples: dict[tuple[int, int], list[float]] = {point: [] for point in prompts}
        for round_ in range(grid.repeats):
            for point, taken in samples.items():
                taken.append(self.decode_sample(prompts[point], grid.decode_steps))
            progress(f"decode round {round_ + 1}/{grid.repeats}: {len(samples)} points")
        rows = tuple(tuple(statistics.median(samples[b, t]) for t in ys) for b in xs)
        for batch, row in zip(xs, rows, strict=True):
            values = ", ".join(f"ctx {t} {s * 1e3:.1f} ms" for t, s in zip(ys, row, strict=True))
            progress(f"decode batch={batch}: {values}")
        return Grid2D("batch_size", "total_context", xs, ys, rows)
