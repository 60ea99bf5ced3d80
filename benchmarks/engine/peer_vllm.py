"""vLLM's offline ``LLM`` behind the benchmark's System protocol; runs in the peer venv.

Only ``benchmarks.engine.child`` imports this, in a process started with the peer's
Python (``loadgen.peers.vllm_peer()``). Setup mirrors ours: same checkpoint directory,
explicit dtype, prompts as token ids (no tokenizer round trip), greedy, ``ignore_eos``,
no detokenization, the same KV cache size and thread count (the environment the parent
sets: ``loadgen.peers.vllm_environment``, with the engine core in this process so that one
process's peak RSS is the whole cost).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.engine.systems import RunOutput
from benchmarks.engine.workloads import Request


class VLLMOffline:
    name = "vllm"

    def __init__(self, path: Path, dtype: str, max_num_seqs: int, kv_cache_gib: int) -> None:
        from vllm import LLM, SamplingParams

        self.options = {
            "model": str(path),
            "dtype": dtype,
            "max_num_seqs": max_num_seqs,
            "seed": 0,
        }
        self.llm = LLM(**self.options)
        self.sampling_params = SamplingParams
        self.kv_cache_gib = kv_cache_gib

    def generate(self, requests: Sequence[Request]) -> RunOutput:
        params = [
            self.sampling_params(
                max_tokens=r.max_new_tokens, temperature=0.0, ignore_eos=True, detokenize=False
            )
            for r in requests
        ]
        prompts: list[Any] = [{"prompt_token_ids": list(r.prompt)} for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        cached = sum(o.num_cached_tokens or 0 for o in outputs)
        return RunOutput(tokens, sum(len(t) for t in tokens), cached_tokens=cached)

    def close(self) -> None:
        del self.llm

    def describe(self) -> dict[str, Any]:
        import vllm

        env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
        return {"api": "vllm.LLM.generate", "version": vllm.__version__, **self.options, "env": env}
