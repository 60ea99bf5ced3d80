"""The systems the engine benchmark compares, behind one protocol: ``generate(requests)``
returns every request's tokens (exactly as many as it asked for) and how many were
decoded. ``ours`` is ``engine.LLM``; ``vllm`` is vLLM's offline ``LLM`` (peer venv,
``benchmarks.engine.peer_vllm``); ``hf`` and ``hf_static`` are ``model.generate``, one at a
time or in static batches; ``hf_cb`` is transformers' continuous batching. Each is built
in its own process (``benchmarks.engine.child``) with an explicit dtype.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from benchmarks.engine.spec import ChildSpec
from benchmarks.engine.workloads import Plan, Request


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


def load_hf_model(path: Path, dtype: str = "float32") -> Any:
    """A fresh HF model in ``dtype`` whose generate() stops only at max_new_tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
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

    def __init__(self, path: Path, dtype: str) -> None:
        self.model = load_hf_model(path, dtype)
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

    def __init__(self, path: Path, dtype: str, batch_size: int) -> None:
        super().__init__(path, dtype)
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

    def __init__(
        self, path: Path, dtype: str, api: str, plan: Plan, num_blocks: int | None
    ) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.generation.continuous_batching.utils import WorkloadHints

        self.model = load_hf_model(path, dtype)
        self.api = api
        self.gen_config = GenerationConfig(
            do_sample=False, eos_token_id=-1, pad_token_id=pad_id_of(self.model)
        )
        # What generate_batch would derive from the mixed workload; sizes the batch limits.
        self.hints = WorkloadHints(
            max_prompt_length=max(plan.mixed_prompt[1], plan.batch1_prompt),
            max_generated_length=max(plan.mixed_new[1], plan.batch1_new, plan.decode_new),
            num_requests=max(plan.mixed_requests, plan.decode_requests),
        )
        self.cb_config = ContinuousBatchingConfig()
        if num_blocks is None:  # enough pages for every request at once; RAM*0.6 is wasteful
            tokens = self.hints.max_prompt_length + self.hints.max_generated_length
            per_request = math.ceil(tokens / self.cb_config.page_size) + 1
            num_blocks = self.hints.num_requests * per_request
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


def make_system(spec: ChildSpec) -> System:
    """The system ``spec`` names, loaded from ``spec.model`` in ``spec.dtype``."""
    path = Path(spec.model)
    if spec.system == "hf":
        return HFSequential(path, spec.dtype)
    if spec.system == "hf_static":
        return HFStatic(path, spec.dtype, spec.plan.static_batch_size)
    if spec.system == "hf_cb":
        return HFContinuous(path, spec.dtype, spec.cb_api, spec.plan, spec.cb_num_blocks)
    max_seqs = max(64, spec.plan.mixed_requests, spec.plan.decode_requests)
    if spec.system == "vllm":
        from benchmarks.engine.peer_vllm import VLLMOffline

        return VLLMOffline(path, spec.dtype, max_seqs, spec.kv_cache_gib)
    if spec.system == "ours":
        kwargs = {
            "dtype": spec.dtype,
            "num_threads": spec.threads,
            "max_num_seqs": max_seqs,
            "kv_cache_gib": float(spec.kv_cache_gib),
        }
        return Ours(path, {**kwargs, **spec.engine_args})
    raise ValueError(f"unknown system {spec.system!r}")
