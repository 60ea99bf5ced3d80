"""Engine throughput: pdserve's engine against three Hugging Face baselines, in one run.

What is measured (same machine, same torch threads, same prompts, greedy, ignore-EOS):

* ``batch1``  one request at a time: a 128-token prompt, 64 new tokens, repeated (median).
  Besides the 64-token run, each repeat times a 1-token run on another prompt of the same
  length: that is TTFT, and TPOT = (wall_64 - TTFT) / 63 is the per-token decode time that
  the roofline bounds.
* ``mixed``   32 requests submitted together; prompt lengths uniform in [32, 512], output
  lengths uniform in [16, 128] (seeded), run once per system.

Systems:

* ``hf``         ``model.generate`` one request at a time.
* ``hf_static``  ``model.generate`` on static batches (``--static-batch-size``, in arrival
  order), left padded with an attention mask; a batch runs until its longest request is
  done, so only the tokens each request asked for count as useful output.
* ``hf_cb``      transformers' continuous batching. By default it drives the
  ``ContinuousBatchingManager`` that ``generate_batch`` uses, opened once (like our
  ``LLM``) and fed with per-request ``max_new_tokens`` via ``add_request``.
  ``--cb-api generate_batch`` calls ``model.generate_batch`` instead: that API takes one
  ``max_new_tokens`` for all requests (we use the max and count useful tokens only) and
  builds, warms up and tears down its manager and KV cache inside every call.
* ``ours``       ``engine.LLM.generate`` with one ``SamplingParams`` per request.

Every prompt is drawn from a seeded RNG over the vocabulary minus special tokens and is
used once per system (warm-up and TTFT runs use their own prompts), so no system gets
prefix-cache hits; ``cached_tokens`` reported by our engine is checked to stay 0.
Ignoring EOS: HF runs with the model's ``eos_token_id`` cleared (EOS may be generated but
does not stop), continuous batching with ``eos_token_id=-1``, ours with
``ignore_eos=True``. The harness checks that every request got exactly the tokens it asked
for, and reports how often each system's greedy output equals the ``hf`` reference
(batched fp32 math may legitimately drift after some tokens; a low match rate for ours
is a bug signal, not a speed result).

Reading the table: ``tok/s`` = useful output tokens / wall seconds (prompt tokens are not
counted); ``ours x`` = our tok/s divided by that row's tok/s on the same workload, so > 1
means we are faster. The goals (PASS/MISS) are: batch1 ours/hf >= 1.0; mixed
ours/hf_static >= 1.5 and ours/hf_cb >= 2.0. ``decoded tok`` > ``useful tok`` is wasted
work (static batches decoding past a request's end); ``match hf`` is the share of requests
whose tokens equal the ``hf`` reference exactly.

The roofline line gives the lower bound on batch-1 decode time per token: weight bytes
(tied embeddings counted once) / memory bandwidth, the better of a 512 MiB tensor copy
(read + write bytes) and a 512 MiB read (a sum), best of 5 each; decode only reads weights,
so the faster figure keeps the bound a bound. It also prints what fraction of that bound
each system's TPOT reaches (100 % = memory-bound ideal).

Timings on a shared machine are noisy: with all cores in use by torch, one busy core stalls
every parallel region, so a run may take several times longer; the script warns when the
load average is high and the JSON records it. ``--threads 1`` is steadier for development.
Results: ``benchmarks/results/engine_throughput.json`` (``_quick`` suffix, or ``--out``).

Run: ``make bench`` or ``python benchmarks/engine_throughput.py [--quick] [--threads N]
[--out PATH] [--skip-ours] [--systems hf,ours] [--cb-api generate_batch]
[--engine-arg max_num_batched_tokens=512]``. Exit status 1 if any system failed.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import gc
import math
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import _common as bench

SYSTEMS = ("hf", "hf_static", "hf_cb", "ours")
REFERENCE_SYSTEM = "hf"
SKIPPED = {("hf_static", "batch1")}  # a static batch of one is exactly hf
GOALS = (  # (workload, baseline system, minimum ours/baseline throughput ratio)
    ("batch1", "hf", 1.0),
    ("mixed", "hf_static", 1.5),
    ("mixed", "hf_cb", 2.0),
)


# --------------------------------------------------------------------------- workloads


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


@dataclass(frozen=True, slots=True)
class Plan:
    """Sizes of one benchmark run; ``quick`` shrinks everything for a smoke test."""

    batch1_prompt: int = 128
    batch1_new: int = 64
    batch1_repeats: int = 3
    mixed_requests: int = 32
    mixed_prompt: tuple[int, int] = (32, 512)
    mixed_new: tuple[int, int] = (16, 128)
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
    return [batch1, mixed]


def warmup_rounds(plan: Plan, sampler: TokenSampler) -> list[list[Request]]:
    """Untimed rounds shaped like the workloads: first calls pay one-off kernel set-up."""
    return [
        [Request(sampler.prompt(plan.batch1_prompt), 4)],
        [Request(sampler.prompt(n), 4) for n in (plan.mixed_prompt[1], plan.mixed_prompt[0])],
    ]


# --------------------------------------------------------------------------- systems


@dataclass(slots=True)
class RunOutput:
    tokens: list[list[int]]  # generated ids per request, truncated to what it asked for
    computed_tokens: int  # tokens actually decoded, including padding-batch overshoot
    cached_tokens: int = 0  # prompt tokens served from a prefix cache (must stay 0)


class System(Protocol):
    name: str

    def generate(self, requests: Sequence[Request]) -> RunOutput: ...

    def close(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


def load_hf_model(path: Path) -> Any:
    """A fresh fp32 HF model whose generate() stops only at max_new_tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # ignore_eos: EOS may be generated but must not end a sequence (min_new_tokens would
    # instead forbid EOS and change the greedy tokens).
    model.generation_config.eos_token_id = None
    return model


def pad_id_of(model: Any) -> int:
    for pad in (model.generation_config.pad_token_id, model.config.pad_token_id):
        if pad is not None:
            return int(pad)
    return 0  # any id works: padded positions are masked out


class HFSequential:
    name = "hf"

    def __init__(self, path: Path) -> None:
        self.model = load_hf_model(path)
        self.pad_id = pad_id_of(self.model)

    def generate(self, requests: Sequence[Request]) -> RunOutput:
        tokens = [self._one(r) for r in requests]
        return RunOutput(tokens, computed_tokens=sum(len(t) for t in tokens))

    def _one(self, request: Request) -> list[int]:
        import torch

        ids = torch.tensor([request.prompt])
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=request.max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
        )
        return out[0, ids.shape[1] :].tolist()

    def close(self) -> None:
        del self.model

    def describe(self) -> dict[str, Any]:
        return {"api": "generate", "attn_implementation": self.model.config._attn_implementation}


class HFStatic(HFSequential):
    name = "hf_static"

    def __init__(self, path: Path, batch_size: int) -> None:
        super().__init__(path)
        self.batch_size = batch_size

    def generate(self, requests: Sequence[Request]) -> RunOutput:
        tokens: list[list[int]] = []
        computed = 0
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            rows, steps = self._batch(batch)
            tokens += [row[: r.max_new_tokens] for row, r in zip(rows, batch, strict=True)]
            computed += steps * len(batch)
        return RunOutput(tokens, computed_tokens=computed)

    def _batch(self, batch: Sequence[Request]) -> tuple[list[list[int]], int]:
        import torch

        width = max(len(r.prompt) for r in batch)
        steps = max(r.max_new_tokens for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: prompts end where generation starts
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt) :] = 1
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=self.pad_id,
        )
        if out.shape[1] - width != steps:
            raise RuntimeError(f"hf_static generated {out.shape[1] - width} tokens, not {steps}")
        return out[:, width:].tolist(), steps

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "batch_size": self.batch_size, "padding": "left"}


class HFContinuous:
    """transformers' continuous batching, through its manager or ``generate_batch``."""

    name = "hf_cb"

    def __init__(self, path: Path, api: str, plan: Plan, num_blocks: int | None) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.generation.continuous_batching.utils import WorkloadHints

        self.model = load_hf_model(path)
        self.api = api
        self.gen_config = GenerationConfig(
            do_sample=False, eos_token_id=-1, pad_token_id=pad_id_of(self.model)
        )
        # What generate_batch would derive from the mixed workload; sizes the batch limits.
        self.hints = WorkloadHints(
            max_prompt_length=max(plan.mixed_prompt[1], plan.batch1_prompt),
            max_generated_length=max(plan.mixed_new[1], plan.batch1_new),
            num_requests=plan.mixed_requests,
        )
        self.cb_config = ContinuousBatchingConfig()
        if num_blocks is None:  # enough pages for every request at once; RAM*0.6 is wasteful
            tokens = self.hints.max_prompt_length + self.hints.max_generated_length
            per_request = math.ceil(tokens / self.cb_config.page_size) + 1
            num_blocks = plan.mixed_requests * per_request
        self.cb_config.num_blocks = num_blocks or None  # 0: transformers' own sizing
        self.stack = contextlib.ExitStack()
        self.manager: Any = None
        self.counter = 0
        if api == "manager":  # opened once, kept across runs, like our LLM's KV cache
            self.manager = self.stack.enter_context(
                self.model.continuous_batching_context_manager(
                    generation_config=self.gen_config,
                    continuous_batching_config=self.cb_config,
                    block=True,
                    timeout=10,
                    workload_hints=self.hints,
                )
            )

    def generate(self, requests: Sequence[Request]) -> RunOutput:
        if self.api == "generate_batch":
            return self._generate_batch(requests)
        ids = []
        for r in requests:
            self.counter += 1
            ids.append(f"bench-{self.counter}")
            self.manager.add_request(
                input_ids=list(r.prompt),
                request_id=ids[-1],
                max_new_tokens=r.max_new_tokens,
                eos_token_id=-1,
            )
        results = self._collect(set(ids))
        tokens = [list(results[i].generated_tokens) for i in ids]
        return RunOutput(tokens, computed_tokens=sum(len(t) for t in tokens))

    def _collect(self, pending: set[str]) -> dict[str, Any]:
        results: dict[str, Any] = {}
        while pending:
            result = self.manager.get_result(timeout=1)
            if result is None:
                if not self.manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread died")
                continue
            if result.request_id in pending and result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"hf_cb request failed: {result.error}")
                results[result.request_id] = result
                pending.discard(result.request_id)
        return results

    def _generate_batch(self, requests: Sequence[Request]) -> RunOutput:
        steps = max(r.max_new_tokens for r in requests)
        out = self.model.generate_batch(
            inputs=[list(r.prompt) for r in requests],
            generation_config=self.gen_config,
            continuous_batching_config=self.cb_config,
            max_new_tokens=steps,
        )
        rows = [list(o.generated_tokens) for o in out.values()]
        if len(rows) != len(requests) or any(len(row) != steps for row in rows):
            raise RuntimeError("generate_batch did not return every request at full length")
        tokens = [row[: r.max_new_tokens] for row, r in zip(rows, requests, strict=True)]
        return RunOutput(tokens, computed_tokens=steps * len(requests))

    def close(self) -> None:
        self.stack.close()
        del self.model

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"api": self.api, "workload_hints": asdict(self.hints)}
        if self.manager is not None:
            cfg = self.manager.continuous_batching_config
            info.update(
                attn_implementation=self.model.config._attn_implementation,
                page_size=cfg.page_size,
                num_blocks=cfg.num_blocks,
                max_batch_tokens=cfg.max_batch_tokens,
                max_requests_per_batch=cfg.max_requests_per_batch,
            )
        return info


class Ours:
    name = "ours"

    def __init__(self, path: Path, engine_kwargs: dict[str, Any]) -> None:
        from engine import LLM, SamplingParams

        self.kwargs = {"model": str(path), **engine_kwargs}
        self.llm = LLM(**self.kwargs)
        self.sampling_params = SamplingParams

    def generate(self, requests: Sequence[Request]) -> RunOutput:
        params = [
            self.sampling_params(max_tokens=r.max_new_tokens, temperature=0.0, ignore_eos=True)
            for r in requests
        ]
        outputs = self.llm.generate([list(r.prompt) for r in requests], params)
        if len(outputs) != len(requests):
            raise RuntimeError(f"LLM.generate returned {len(outputs)} outputs for {len(requests)}")
        for out, r in zip(outputs, requests, strict=True):
            if out.prompt_tokens != len(r.prompt):
                raise RuntimeError("LLM.generate outputs are not in prompt order")
            reason = getattr(out.finish_reason, "value", out.finish_reason)
            if reason != "length":
                raise RuntimeError(f"ours finished a request with {reason!r}, expected 'length'")
        tokens = [list(o.token_ids) for o in outputs]
        cached = sum(o.cached_tokens for o in outputs)
        return RunOutput(tokens, sum(len(t) for t in tokens), cached_tokens=cached)

    def close(self) -> None:
        closer = getattr(self.llm, "close", None)  # not required; the LLM may hold no resources
        if callable(closer):
            closer()
        del self.llm

    def describe(self) -> dict[str, Any]:
        return {"api": "LLM.generate", "engine_kwargs": self.kwargs}


# --------------------------------------------------------------------------- measuring


@dataclass(slots=True)
class Measurement:
    system: str
    workload: str
    num_requests: int
    useful_tokens: int  # output tokens the requests asked for, per repeat
    computed_tokens: int  # output tokens the system decoded, per repeat
    prompt_tokens: int
    wall_s: list[float] = field(default_factory=list)  # one per repeat
    ttft_s: list[float] = field(default_factory=list)  # batch1: 1-token runs
    cached_tokens: int = 0
    exact_match_vs_ref: float | None = None  # fraction of requests equal to the hf output
    prefix_match_vs_ref: float | None = None  # mean matching-prefix share of each output

    @property
    def wall(self) -> float:
        return bench.median(self.wall_s)

    @property
    def tok_s(self) -> float:
        return self.useful_tokens / self.wall

    @property
    def ttft(self) -> float | None:
        return bench.median(self.ttft_s) if self.ttft_s else None

    @property
    def tpot(self) -> float | None:
        """Median over rounds of (wall - TTFT) / (tokens - 1); None if noise made it <= 0."""
        if not self.ttft_s or self.useful_tokens < 2:
            return None
        pairs = zip(self.wall_s, self.ttft_s, strict=True)
        per_round = [(wall - ttft) / (self.useful_tokens - 1) for wall, ttft in pairs]
        value = bench.median(per_round)
        return value if value > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "wall_median_s": self.wall,
            "tok_s": self.tok_s,
            "ttft_median_s": self.ttft,
            "tpot_s": self.tpot,
        }


def run_workload(system: System, workload: Workload) -> tuple[Measurement, list[list[int]]]:
    """Time every round of ``workload`` on ``system`` (plus its 1-token TTFT runs)."""
    first = workload.rounds[0]
    m = Measurement(
        system=system.name,
        workload=workload.name,
        num_requests=len(first),
        useful_tokens=sum(r.max_new_tokens for r in first),
        computed_tokens=0,
        prompt_tokens=sum(len(r.prompt) for r in first),
    )
    tokens: list[list[int]] = []
    for i, requests in enumerate(workload.rounds):
        if i < len(workload.ttft_prompts):
            probe = [Request(workload.ttft_prompts[i], 1)]
            m.ttft_s.append(timed_run(system, probe)[1])
        out, wall = timed_run(system, requests)
        m.wall_s.append(wall)
        m.computed_tokens = out.computed_tokens
        m.cached_tokens += out.cached_tokens
        tokens += out.tokens
    return m, tokens


def timed_run(system: System, requests: Sequence[Request]) -> tuple[RunOutput, float]:
    out, wall = bench.timed(lambda: system.generate(requests))
    check_lengths(system.name, requests, out)
    return out, wall


def _secs(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values) + " s"


def check_lengths(name: str, requests: Sequence[Request], out: RunOutput) -> None:
    if len(out.tokens) != len(requests):
        raise RuntimeError(f"{name}: {len(out.tokens)} outputs for {len(requests)} requests")
    for i, (toks, r) in enumerate(zip(out.tokens, requests, strict=True)):
        if len(toks) != r.max_new_tokens:
            raise RuntimeError(
                f"{name}: request {i} got {len(toks)} tokens, asked for {r.max_new_tokens}"
            )


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(share of identical outputs, mean share of each output matching before divergence)."""
    exact, prefix = 0, 0.0
    for got, want in zip(outputs, reference, strict=True):
        same = next(
            (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), len(want)
        )
        exact += same == len(want)
        prefix += same / max(len(want), 1)
    return exact / len(reference), prefix / len(reference)


def make_system(name: str, args: argparse.Namespace, plan: Plan, path: Path) -> System:
    if name == "hf":
        return HFSequential(path)
    if name == "hf_static":
        return HFStatic(path, plan.static_batch_size)
    if name == "hf_cb":
        return HFContinuous(path, args.cb_api, plan, args.cb_num_blocks)
    kwargs = {"num_threads": args.threads, "max_num_seqs": max(64, plan.mixed_requests)}
    return Ours(path, {**kwargs, **args.engine_arg})


def benchmark_system(
    name: str,
    make: Callable[[], System],
    workloads: Sequence[Workload],
    warmup: list[list[Request]],
) -> tuple[dict[str, Any], list[Measurement], dict[str, list[list[int]]]]:
    system, setup_s = bench.timed(make)
    try:
        warm_s = [timed_run(system, requests)[1] for requests in warmup]
        print(f"[{name}] set up in {setup_s:.1f} s, warm-up rounds {_secs(warm_s)}", flush=True)
        info = {"setup_s": setup_s, "warmup_s": warm_s, **system.describe()}
        results, outputs = [], {}
        for workload in workloads:
            if (name, workload.name) in SKIPPED:
                continue
            m, tokens = run_workload(system, workload)
            results.append(m)
            outputs[workload.name] = tokens
            print(
                f"[{name}] {workload.name}: {m.tok_s:.1f} tok/s, walls {_secs(m.wall_s)}",
                flush=True,
            )
    finally:
        system.close()
        gc.collect()
    return info, results, outputs


# --------------------------------------------------------------------------- roofline


def measure_bandwidth(mib: int, repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` copy and read bandwidth of a ``mib``-MiB fp32 tensor (bytes/s)."""
    import torch

    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page before timing
    copy_s = min(bench.timed(lambda: dst.copy_(src))[1] for _ in range(repeats))
    read_s = min(bench.timed(lambda: src.sum().item())[1] for _ in range(repeats))
    return {
        "tensor_bytes": src.nbytes,
        "copy_bytes_per_s": 2 * src.nbytes / copy_s,  # STREAM convention: read + write
        "read_bytes_per_s": src.nbytes / read_s,
    }


def weight_bytes(path: Path) -> dict[str, int]:
    model = load_hf_model(path)
    params = list(model.parameters())  # deduplicated: tied embeddings appear once
    info = {
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "num_params": sum(p.numel() for p in params),
    }
    del model
    return info


def roofline(model_info: dict[str, int], bw: dict[str, float], results: list[Measurement]) -> dict:
    """Batch-1 decode streams every weight once per token: time >= weight bytes / bandwidth.

    The best measured bandwidth is used (decode only reads weights; a copy also writes), so
    the bound stays a bound: no system can legitimately reach more than 100 % of it.
    """
    bandwidth = max(bw["copy_bytes_per_s"], bw["read_bytes_per_s"])
    bound_s = model_info["weight_bytes"] / bandwidth
    fractions = {m.system: bound_s / m.tpot for m in results if m.workload == "batch1" and m.tpot}
    return {
        "bandwidth_bytes_per_s": bandwidth,
        "decode_s_per_token_bound": bound_s,
        "max_tok_s": 1 / bound_s,
        "fraction_of_roofline": fractions,
    }


# --------------------------------------------------------------------------- report


def ratio(results: list[Measurement], workload: str, baseline: str) -> float | None:
    by = {m.system: m for m in results if m.workload == workload}
    if "ours" not in by or baseline not in by:
        return None
    return by["ours"].tok_s / by[baseline].tok_s


def print_report(results: list[Measurement], roof: dict, model_info: dict, bw: dict) -> list:
    rows = []
    for m in results:
        r = ratio(results, m.workload, m.system)
        rows.append(
            [
                m.workload,
                m.system,
                m.num_requests,
                m.useful_tokens,
                m.computed_tokens,
                m.wall,
                m.tok_s,
                None if m.ttft is None else m.ttft * 1e3,
                None if m.tpot is None else m.tpot * 1e3,
                None if m.exact_match_vs_ref is None else m.exact_match_vs_ref,
                None if r is None else r,
            ]
        )
    bench.print_table(
        [
            "workload",
            "system",
            "reqs",
            "useful tok",
            "decoded tok",
            "wall s",
            "tok/s",
            "TTFT ms",
            "TPOT ms",
            "match hf",
            "ours x",
        ],
        rows,
        title="Engine throughput (tok/s = useful output tokens / wall s)",
    )
    bound = roof["decode_s_per_token_bound"]
    print(
        f"\nBatch-1 roofline: {model_info['weight_bytes'] / 1e6:.1f} MB weights / "
        f"{roof['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s = {bound * 1e3:.2f} ms/token "
        f"(<= {1 / bound:.1f} tok/s). Bandwidth, best of: copy (read+write) "
        f"{bw['copy_bytes_per_s'] / 1e9:.2f} GB/s, read {bw['read_bytes_per_s'] / 1e9:.2f} GB/s"
    )
    for system, frac in roof["fraction_of_roofline"].items():
        print(f"  {system}: TPOT reaches {frac:.0%} of the roofline")
    goals = []
    print("\nGoals:")
    for workload, baseline, target in GOALS:
        got = ratio(results, workload, baseline)
        status = "n/a" if got is None else ("PASS" if got >= target else "MISS")
        shown = "-" if got is None else f"{got:.2f}x"
        print(f"  {workload}: ours vs {baseline} >= {target:.1f}x: {shown} {status}")
        goals.append(
            {
                "workload": workload,
                "baseline": baseline,
                "target": target,
                "ratio": got,
                "status": status,
            }
        )
    return goals


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="small smoke-test workloads (<1 min)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--model", help="local HF checkpoint dir (default: the converted SmolLM2)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of " + str(SYSTEMS))
    p.add_argument("--skip-ours", action="store_true", help="benchmark only the HF baselines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--static-batch-size", type=int, help="hf_static batch size (default 8)")
    p.add_argument("--cb-api", choices=("manager", "generate_batch"), default="manager")
    p.add_argument(
        "--cb-num-blocks",
        type=int,
        help="hf_cb KV pages (default: enough for every request at once; 0: transformers' own)",
    )
    p.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra EngineConfig field for ours (repeatable)",
    )
    args = p.parse_args(argv)
    skipped = {"ours"} if args.skip_ours else set()
    args.systems = [s for s in args.systems.split(",") if s and s not in skipped]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    args.engine_arg = dict(_parse_kv(item, p) for item in args.engine_arg)
    return args


def _parse_kv(item: str, parser: argparse.ArgumentParser) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep:
        parser.error(f"--engine-arg wants KEY=VALUE, got {item!r}")
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def check_engine_importable() -> None:
    try:
        from engine import LLM, SamplingParams  # noqa: F401
    except ImportError as exc:
        sys.exit(
            f"our engine is not importable ({exc}); `from engine import LLM, SamplingParams` "
            "must work, or run with --skip-ours to benchmark only the HF baselines"
        )


def setup_environment(args: argparse.Namespace) -> Path:
    """Offline defaults, threads, and the checkpoint every system loads."""
    bench.ensure_repo_on_path()
    os.environ.setdefault("PDSERVE_CACHE_DIR", str(bench.REPO_ROOT / ".cache"))
    from common import env

    env.apply_offline_defaults()
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    from engine.model_loader import ensure_default_model, resolve_model

    return ensure_default_model() if args.model is None else resolve_model(args.model).path


def make_sampler(path: Path, seed: int) -> TokenSampler:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    vocab = min(AutoConfig.from_pretrained(path).vocab_size, len(tokenizer))
    return TokenSampler(vocab, excluded, seed)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    path = setup_environment(args)
    busy = bench.busy_machine_warning()
    if busy:
        print(busy)
    if "ours" in args.systems:
        check_engine_importable()
    plan = Plan.quick() if args.quick else Plan()
    if args.static_batch_size:
        plan = dataclasses.replace(plan, static_batch_size=args.static_batch_size)
    sampler = make_sampler(path, args.seed)
    workloads = build_workloads(plan, sampler)
    warmup = warmup_rounds(plan, sampler)

    environment = {**bench.environment_info(), "threads": args.threads}
    model_info = weight_bytes(path)
    bw = measure_bandwidth(plan.bandwidth_mib)
    systems: dict[str, Any] = {}
    results: list[Measurement] = []
    outputs: dict[str, dict[str, list[list[int]]]] = {}
    for name in args.systems:
        try:
            info, measured, outs = benchmark_system(
                name, lambda name=name: make_system(name, args, plan, path), workloads, warmup
            )
        except Exception as exc:  # keep the other systems' numbers; fail at the end
            traceback.print_exc()
            systems[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        systems[name], outputs[name] = info, outs
        results += measured
    if REFERENCE_SYSTEM in outputs:
        for m in results:
            ref = outputs[REFERENCE_SYSTEM][m.workload]
            got = outputs[m.system][m.workload]
            m.exact_match_vs_ref, m.prefix_match_vs_ref = agreement(got, ref)
    for m in results:
        if m.cached_tokens:
            print(f"warning: {m.system} served {m.cached_tokens} prompt tokens from cache")

    roof = roofline(model_info, bw, results)
    goals = print_report(results, roof, model_info, bw)
    payload = {
        "benchmark": "engine_throughput",
        "quick": args.quick,
        "environment": environment,
        "load_average_end": list(os.getloadavg()),
        "model": {"path": str(path), **model_info},
        "plan": asdict(plan),
        "seed": args.seed,
        "bandwidth": bw,
        "roofline": roof,
        "systems": systems,
        "workloads": {
            w.name: [
                [{"prompt_len": len(r.prompt), "max_new_tokens": r.max_new_tokens} for r in rnd]
                for rnd in w.rounds
            ]
            for w in workloads
        },
        "results": [m.to_json() for m in results],
        "goals": goals,
        "total_s": time.perf_counter() - started,
    }
    name = "engine_throughput" + ("_quick" if args.quick else "")
    out = bench.write_json(payload, name, args.out)
    print(f"\nwrote {out} ({payload['total_s']:.0f} s total)")
    failed = [name for name, info in systems.items() if "error" in info]
    if failed:
        print(f"FAILED systems: {', '.join(failed)} (see the tracebacks above)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
