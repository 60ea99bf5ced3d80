"""Where a decode step's time goes: ``python -m engine.profile_step --batch 1 --batch 32``.

Fills a running batch (prompts of ``--prompt-len`` tokens), then times ``--steps`` decode
steps with ``torch.profiler`` and prints ms/step by op category. "host (python)" is the
step's wall time minus the time spent inside torch ops: scheduling, building the step's
tensors, module calls. The numbers land in benchmarks/README.md ("Engine profile").
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from torch.profiler import ProfilerActivity, profile

from common.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine

# First matching substring wins; order matters (addmm before mm, etc.).
CATEGORIES = (
    ("linear (GEMM)", ("addmm", "aten::mm", "linear", "matmul", "aten::bmm")),
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("KV write / gather", ("index_copy", "index_select", "gather", "index")),
    ("norm + activations", ("rsqrt", "pow", "mean", "silu")),
    ("elementwise + copies", ("mul", "add", "cat", "neg", "copy_", "to", "sub", "div", "where")),
    ("sampling", ("argmax", "softmax", "topk", "sort", "multinomial")),
)


def _category(name: str) -> str:
    for label, keys in CATEGORIES:
        if any(key in name for key in keys):
            return label
    return "other ops"


def prompt_lengths(batch: int, prompt_len: int, mixed: bool) -> list[int]:
    """``prompt_len`` each, or with ``mixed`` spread evenly over 32..512 (the 32-mixed
    workload's range), so decode rows have very different contexts."""
    if not mixed or batch == 1:
        return [prompt_len] * batch
    return [32 + (480 * i) // (batch - 1) for i in range(batch)]


def profile_decode(
    batch: int, prompt_len: int, steps: int, dtype: str, threads: int, mixed: bool, top: int
) -> None:
    engine = LLMEngine(EngineConfig(dtype=dtype, num_threads=threads, num_kv_blocks=2048))
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for i, n in enumerate(prompt_lengths(batch, prompt_len, mixed)):
        engine.add_request(f"r{i}", [100 + (i * 7 + j) % 5000 for j in range(n)], params)
    started: set[str] = set()
    while len(started) < batch:  # prefill every prompt (each then has its first token)
        started.update(out.request_id for out in engine.step())
    for _ in range(3):  # warm-up decode steps
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    by_category: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        by_category[_category(event.key)] += event.self_cpu_time_total / 1e3 / steps
    op_ms = sum(by_category.values())
    shape = "contexts 32-512" if mixed and batch > 1 else f"context ~{prompt_len}"
    print(f"\n{engine.config.dtype}, batch {batch}, {shape}: {wall_ms:.2f} ms/step")
    print(f"| {'category':24} | ms/step | share |\n|---|---|---|")
    rows = sorted(by_category.items(), key=lambda kv: -kv[1])
    rows.append(("host (python)", max(wall_ms - op_ms, 0.0)))
    for label, ms in rows:
        print(f"| {label:24} | {ms:7.2f} | {100 * ms / wall_ms:4.0f}% |")
    if top:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, action="append", help="repeatable (default 1, 32)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mixed", action="store_true", help="prompts spread over 32..512")
    parser.add_argument("--top", type=int, default=0, help="also print the N slowest ops")
    args = parser.parse_args()
    for batch in args.batch or [1, 32]:
        profile_decode(
            batch, args.prompt_len, args.steps, args.dtype, args.threads, args.mixed, args.top
        )


if __name__ == "__main__":
    main()
