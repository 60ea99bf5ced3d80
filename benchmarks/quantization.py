"""Weight quantization: decode tokens/s with int8 weights vs unquantized, same run.

For each activation dtype (bf16, fp32) and batch size (1, 32): an unquantized engine and
an ``quantization="int8"`` engine of the default model decode the same random-token
prompts greedily (``ignore_eos``), alternating round by round so a burst of load from
another process hits both; the decode phase alone is timed (from the step after every
request has its first token to the last token), and the median of the rounds is reported.
Also the fraction of greedy tokens the two engines agree on, the weight memory, and (unless
``--no-micro``) the kernel micro-benchmark at the model's shapes (benchmarks/_quant_kernels).

    python -m benchmarks.quantization [--quick] [--dtypes bfloat16,float32] [--no-micro]
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import torch

from benchmarks import _quant_kernels
from benchmarks._common import announce, bench_parser, print_table, save
from common.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_config import load_model_config
from engine.model_loader import resolve_model
from engine.quantization import weight_bytes

PROMPT_LEN = 32
GOAL_BATCH1 = 1.3  # issue 15: int8 / bf16 decode tokens/s at batch 1


def _engine(dtype: str, quantization: str, batch: int, new_tokens: int) -> LLMEngine:
    blocks = batch * (-(-(PROMPT_LEN + new_tokens) // 16)) + 8
    return LLMEngine(
        EngineConfig(
            dtype=dtype,
            quantization=quantization,
            num_kv_blocks=blocks,
            num_threads=1,
            max_num_seqs=max(batch, 1),
            enable_prefix_caching=False,
        )
    )


def _decode(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list]:
    """(decode tokens/s, each request's greedy tokens) for one batch run to completion."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    tag = time.monotonic_ns()
    ids = [f"q{tag}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    start = None
    counted = 0
    while engine.has_unfinished():
        began = all(tokens[rid] for rid in ids)
        if began and start is None:
            start = time.perf_counter()
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if start is not None:
                counted += len(out.new_token_ids)
    elapsed = time.perf_counter() - (start or time.perf_counter())
    return counted / elapsed if elapsed > 0 else 0.0, [tokens[rid] for rid in ids]


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions where two runs' greedy tokens are equal (position by position:
    once a sequence diverges, its later tokens mostly differ too)."""
    same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    return same / max(1, sum(len(r) for r in a))


def _first_divergence(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean index of the first differing greedy token (the length if none differ)."""
    firsts = []
    for ra, rb in zip(a, b, strict=True):
        split = next((i for i, (x, y) in enumerate(zip(ra, rb, strict=True)) if x != y), len(ra))
        firsts.append(split)
    return statistics.mean(firsts)


def _compare(dtype: str, batch: int, new_tokens: int, rounds: int) -> dict[str, Any]:
    engines = {m: _engine(dtype, m, batch, new_tokens) for m in ("none", "int8")}
    rng = random.Random(batch)
    vocab = engines["none"].model_config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(PROMPT_LEN)] for _ in range(batch)]
    for engine in engines.values():  # warm up
        _decode(engine, prompts[:1], 4)
    speeds: dict[str, list[float]] = {m: [] for m in engines}
    outputs: dict[str, list] = {}
    for _ in range(rounds):
        for method, engine in engines.items():
            tok_s, outputs[method] = _decode(engine, prompts, new_tokens)
            speeds[method].append(tok_s)
    none_tok_s, int8_tok_s = (statistics.median(speeds[m]) for m in ("none", "int8"))
    return {
        "dtype": dtype,
        "batch": batch,
        "new_tokens": new_tokens,
        "none_tok_s": none_tok_s,
        "int8_tok_s": int8_tok_s,
        "speedup": int8_tok_s / none_tok_s,
        "rounds": {m: speeds[m] for m in speeds},
        "greedy_agreement": _agreement(outputs["none"], outputs["int8"]),
        "first_divergence": _first_divergence(outputs["none"], outputs["int8"]),
        "weight_mib": {m: weight_bytes(e.model) / 2**20 for m, e in engines.items()},
    }


def _goals(results: list[dict[str, Any]]) -> list[str]:
    """Issue 15's goal, int8 >= 1.3x the bf16 engine's decode tokens/s at batch 1."""
    lines = []
    for r in results:
        if r["batch"] == 1 and r["dtype"] == "bfloat16":
            verdict = "PASS" if r["speedup"] >= GOAL_BATCH1 else "MISS"
            lines.append(
                f"goal int8 >= {GOAL_BATCH1}x bf16 at batch 1: {verdict} ({r['speedup']:.2f}x)"
            )
    return lines


def main() -> None:
    parser = bench_parser(__doc__, "1 round, 16 new tokens, fewer kernel reps")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="activation dtypes")
    parser.add_argument("--batches", default="1,32", help="batch sizes")
    parser.add_argument("--no-micro", action="store_true", help="skip the kernel benchmark")
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = announce()
    rounds, new_tokens, reps = (1, 16, 8) if args.quick else (3, 64, 40)
    dtypes = args.dtypes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    results = [_compare(d, b, new_tokens, rounds) for d in dtypes for b in batches]
    print_table(
        ["dtype", "batch", "none tok/s", "int8 tok/s", "speedup", "agree", "weights MiB"],
        [
            [
                r["dtype"],
                r["batch"],
                r["none_tok_s"],
                r["int8_tok_s"],
                r["speedup"],
                r["greedy_agreement"],
                f"{r['weight_mib']['none']:.0f} -> {r['weight_mib']['int8']:.0f}",
            ]
            for r in results
        ],
        title=f"decode tokens/s, SmolLM2-135M, 1 thread, {new_tokens} new tokens, "
        f"median of {rounds} round(s)",
    )
    goals = _goals(results)
    for line in goals:
        print(line)
    micro = []
    if not args.no_micro:
        source = resolve_model(None)
        model_cfg = load_model_config(source.path, source.name)
        torch_dtypes = [getattr(torch, d) for d in dtypes]
        micro = _quant_kernels.run(model_cfg, torch_dtypes, [1, 8, 32], reps)
        print_table(
            _quant_kernels.HEADERS,
            _quant_kernels.table_rows(micro),
            title="kernel micro-benchmark (median us, 1 thread)",
        )
    save("quantization", {**header, "decode": results, "goals": goals, "micro": micro}, args)


if __name__ == "__main__":
    main()
