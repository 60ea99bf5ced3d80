"""Speculative decoding: batch-1 greedy tokens/s with n-gram speculation on vs off.

Two workloads, same engines, same run: *repeat* — prompts whose answer copies spans of
the prompt (edit this code, repeat the list, multi-turn quoting) — where prompt lookup
should pay off, and *random* — random token ids, where almost nothing is proposed and
the per-request fallback must keep the loss small. Greedy outputs are checked equal.

    python -m benchmarks.speculative [--quick]
"""

from __future__ import annotations

import random
import time

import torch

from benchmarks._common import announce, bench_parser, print_table, save
from common.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine

CODE = '''def moving_average(values, window):
    """Average of each run of `window` consecutive values."""
    out = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''

REPEAT_MESSAGES = [
    f"Rename the function to rolling_mean and return the full code.\n\n{CODE}",
    f"Repeat this code exactly, adding nothing:\n\n{CODE}",
    "Here are my notes: the meeting is on Tuesday at 10am in room 4B; bring the budget "
    "draft, the hiring plan and the Q3 roadmap; Alice presents the budget draft, Bob the "
    "hiring plan and Carol the Q3 roadmap. Repeat my notes back to me word for word.",
    f"{CODE}\nAdd type hints to this function and show the whole function again.",
]


def _engine(method: str, k: int) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            dtype="float32",
            num_kv_blocks=512,
            num_threads=1,
            speculative_method=method,
            num_speculative_tokens=k,
        )
    )


def _generate(engine: LLMEngine, tokens: list[int], max_tokens: int) -> tuple[list[int], float]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    request_id = f"r{time.monotonic_ns()}"
    engine.add_request(request_id, tokens, params)
    out: list[int] = []
    start = time.perf_counter()
    while engine.has_unfinished():
        for step in engine.step():
            out.extend(step.new_token_ids)
    return out, time.perf_counter() - start


def _workloads(engine: LLMEngine, count: int, random_len: int) -> dict[str, list[list[int]]]:
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    repeat = [engine.apply_chat_template([{"role": "user", "content": m}]) for m in REPEAT_MESSAGES]
    rand = [[rng.randrange(vocab) for _ in range(random_len)] for _ in range(count)]
    return {"repeat": repeat[:count], "random": rand}


def main() -> None:
    parser = bench_parser(__doc__, "2 prompts x 48 tokens per workload")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = announce()
    count, max_tokens = (2, 48) if args.quick else (4, 128)
    plain, spec = _engine("none", args.k), _engine("ngram", args.k)
    rows, results = [], {}
    for name, prompts in _workloads(plain, count, 128).items():
        _generate(plain, prompts[0], 4)  # warm both engines up
        _generate(spec, prompts[0], 4)
        t_off = t_on = 0.0
        tokens = 0
        identical = True
        for prompt in prompts:
            off, dt_off = _generate(plain, prompt, max_tokens)
            on, dt_on = _generate(spec, prompt, max_tokens)
            identical &= off == on
            t_off, t_on, tokens = t_off + dt_off, t_on + dt_on, tokens + len(off)
        results[name] = {
            "tokens": tokens,
            "off_tok_s": tokens / t_off,
            "on_tok_s": tokens / t_on,
            "speedup": t_off / t_on,
            "greedy_identical": identical,
        }
        rows.append([name, tokens, tokens / t_off, tokens / t_on, t_off / t_on, identical])
    stats = spec.speculative_stats()
    print_table(
        ["workload", "tokens", "off tok/s", "ngram tok/s", "speedup", "identical"],
        rows,
        title=f"batch-1 greedy, fp32 SmolLM2-135M, k={args.k}",
    )
    print(
        f"drafted {stats.num_draft_tokens}, accepted {stats.num_accepted_tokens} "
        f"({stats.acceptance_rate:.0%}), fallbacks {stats.num_fallbacks}"
    )
    save(
        "speculative",
        {
            **header,
            "k": args.k,
            "max_tokens": max_tokens,
            "workloads": results,
            "acceptance_rate": stats.acceptance_rate,
            "num_fallbacks": stats.num_fallbacks,
        },
        args,
    )


if __name__ == "__main__":
    main()
