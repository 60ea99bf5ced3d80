"""Speculative decoding: batch-1 tokens/s with speculation on vs off (n-gram and draft).

Two workloads, each request alone (batch 1), fp32, one thread:

- *repeat* — prompts whose answer copies spans of the prompt: code editing (as a chat, and
  as a completion that re-emits the edited file), a multi-turn chat whose last answer
  quotes an earlier turn, rewriting a text with one change; greedy. Prompt lookup should
  pay off here; outputs are checked token-identical to plain decoding.
- *random* — prompts of random token ids from the vocabulary and *sampled* output
  (temperature 1, seeded, ignore_eos), so neither the prompt nor the answer repeats itself
  (greedy decoding of a small model loops, which prompt lookup then predicts: not random).
  Speculation must cost little here; the acceptance rate shows how much was proposed.

Rows: ``ngram`` for each k, and ``draft`` for each k when ``--draft-model`` names a draft
checkpoint (``make bench-spec`` writes a self-draft: the first layers of the default
model, ``python -m tests.draft_model``). Each speculating engine also reports where its
step time went (schedule+propose / forward+verify / update) on verify steps vs plain
decode steps, and the plain engine what one chunk of 1 + k tokens costs against a decode
(the cost grows in steps of 3 rows on this CPU: see engine/speculative/tracker.py).

    python -m benchmarks.speculative [--quick] [--k 2,4,5,8] [--draft-model DIR]
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks._common import announce, bench_parser, print_table, save
from common.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.scheduler import ScheduledChunk
from engine.sequence import Sequence
from engine.speculative import SpeculativeStats

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

EMAIL = (
    "Hi team, the release moves from Friday to Monday because the load tests failed on the "
    "staging cluster. Please keep merging fixes into the release branch until Sunday noon, run "
    "the full test suite before every merge, and post the results in the release channel. "
    "Thanks, Dana"
)


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


# Each is a chat (list of messages, through the chat template) or a raw completion prompt.
REPEAT_PROMPTS: list[list[dict[str, str]] | str] = [
    # code editing, chat: the answer is the code with one name changed
    [_user(f"Rename the variable `total` to `running_sum` everywhere in this code and "
           f"return the complete code.\n\n```python\n{CODE}```")],
    # code editing, completion (an "apply the edit" model re-emitting the file)
    f"# stats.py, before the edit\n{CODE}\n# stats.py, after renaming `total` to `running_sum`\n",
    # multi-turn: the last answer quotes an earlier turn
    [
        _user(f"Here is my function:\n\n```python\n{CODE}```"),
        {"role": "assistant", "content": f"It computes a moving average:\n\n```python\n{CODE}```"},
        _user("Add a docstring example and show the whole function again."),
    ],
    # rewriting a document with a small change, completion
    f"Original text:\n{EMAIL}\n\nThe same text, with the date changed to Tuesday:\n",
]  # fmt: skip

RANDOM_PROMPT_LEN = 128
_COST_PARAMS = SamplingParams(temperature=0.0)


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    prompts: list[list[int]]
    params: SamplingParams
    check_identical: bool  # greedy: speculation must not change a token


@dataclass(slots=True)
class StepTimes:
    """Seconds per engine-step phase, split by step kind (verify: any chunk had drafts)."""

    seconds: dict[str, dict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    steps: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def summary(self) -> dict[str, dict[str, float]]:
        """{kind: {phase: ms per step, "steps": count}}."""
        return {
            kind: {"steps": n, **{p: 1e3 * s / n for p, s in self.seconds[kind].items()}}
            for kind, n in self.steps.items()
        }


def _instrument(engine: LLMEngine) -> StepTimes:
    """Time the three calls of each engine step (wrapping them on this instance only)."""
    times = StepTimes()
    scheduler, runner = engine.scheduler, engine.runner
    schedule, execute, update = scheduler.schedule, runner.execute, scheduler.update_from_output
    current = {"kind": "decode"}

    def timed(phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            times.seconds[current["kind"]][phase] += time.perf_counter() - start
            return result

        return wrapper

    def timed_schedule() -> Any:
        start = time.perf_counter()
        out = schedule()
        verify = any(c.draft_token_ids for c in out.scheduled)
        prefill = any(c.num_tokens > 1 and not c.draft_token_ids for c in out.scheduled)
        current["kind"] = "verify" if verify else "prefill" if prefill else "decode"
        times.steps[current["kind"]] += 1
        times.seconds[current["kind"]]["schedule+propose"] += time.perf_counter() - start
        return out

    scheduler.schedule = timed_schedule  # type: ignore[method-assign]
    runner.execute = timed("forward+verify", execute)  # type: ignore[method-assign]
    scheduler.update_from_output = timed("update", update)  # type: ignore[method-assign]
    return times


def _engine(method: str, k: int, draft_model: str | None) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            dtype="float32",
            num_kv_blocks=512,
            num_threads=1,
            speculative_method=method,
            num_speculative_tokens=k,
            draft_model=draft_model if method == "draft" else None,
        )
    )


def _generate(
    engine: LLMEngine, tokens: list[int], params: SamplingParams
) -> tuple[list[int], float]:
    request_id = f"r{time.monotonic_ns()}"
    engine.add_request(request_id, tokens, params)
    out: list[int] = []
    start = time.perf_counter()
    while engine.has_unfinished():
        for step in engine.step():
            out.extend(step.new_token_ids)
    return out, time.perf_counter() - start


def workloads(engine: LLMEngine, count: int, max_tokens: int) -> list[Workload]:
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    repeat = [
        engine.encode(p) if isinstance(p, str) else engine.apply_chat_template(p)
        for p in REPEAT_PROMPTS[:count]
    ]
    rand = [[rng.randrange(vocab) for _ in range(RANDOM_PROMPT_LEN)] for _ in range(count)]
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1, ignore_eos=True)
    return [Workload("repeat", repeat, greedy, True), Workload("random", rand, sampled, False)]


def run_interleaved(engines: list[LLMEngine], load: Workload) -> list[dict[str, Any]]:
    """Tokens, seconds, outputs and speculative counters of one workload on each engine,
    batch 1. Prompt by prompt, the engines take turns, so a busy machine slows them alike
    (the baseline is measured beside every speculating engine, not once)."""
    for engine in engines:  # warm up
        _generate(engine, load.prompts[0], SamplingParams(max_tokens=4, temperature=0.0))
    before = [engine.speculative_stats() for engine in engines]
    outputs: list[list[list[int]]] = [[] for _ in engines]
    seconds = [0.0] * len(engines)
    for prompt in load.prompts:
        for i, engine in enumerate(engines):
            out, dt = _generate(engine, prompt, load.params)
            outputs[i].append(out)
            seconds[i] += dt
    return [
        _result(outputs[i], seconds[i], before[i], engine.speculative_stats())
        for i, engine in enumerate(engines)
    ]


def _result(
    outputs: list[list[int]], seconds: float, before: SpeculativeStats, after: SpeculativeStats
) -> dict[str, Any]:
    drafted = after.num_draft_tokens - before.num_draft_tokens
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    tokens = sum(len(o) for o in outputs)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "drafted": drafted,
        "accepted": accepted,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "verify_steps": after.num_verify_steps - before.num_verify_steps,
        "fallbacks": after.num_fallbacks - before.num_fallbacks,
        "outputs": outputs,
    }


def verify_cost_ms(engine: LLMEngine, widths: list[int], context: int = 256) -> dict[int, float]:
    """Median ms of one forward + verify of a (1 + drafts)-token chunk at ``context``
    tokens, by chunk width (width 1 is a plain decode): what a wider verify costs."""
    seq = Sequence("cost", [1000 + i % 5000 for i in range(context)], _COST_PARAMS, 0)
    blocks = engine.block_manager
    blocks.allocate_prefix(seq)
    blocks.append_slots(seq, context + max(widths))
    engine.runner.execute([ScheduledChunk(seq, 0, context - 1, samples=False)])
    out = {}
    for width in widths:
        chunk = ScheduledChunk(seq, context - 1, width, True, list(range(7, 6 + width)))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            engine.runner.execute([chunk])
            times.append(time.perf_counter() - start)
        out[width] = 1e3 * sorted(times)[len(times) // 2]
    blocks.free(seq)
    return out


def _counters(result: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in result.items() if key != "outputs"}


def _configs(ks: list[int], draft_ks: list[int]) -> list[tuple[str, int]]:
    return [("ngram", k) for k in ks] + [("draft", k) for k in draft_ks]


def main() -> None:
    parser = bench_parser(__doc__, "2 prompts x 48 tokens per workload")
    parser.add_argument("--k", default="2,4,5,8", help="num_speculative_tokens values")
    parser.add_argument("--draft-model", default=None, help="draft checkpoint for 'draft' rows")
    parser.add_argument("--draft-k", default="2,4,8", help="k values of the 'draft' rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = announce()
    count, max_tokens = (2, 48) if args.quick else (4, 128)
    ks = [int(k) for k in args.k.split(",")]
    draft_ks = [int(k) for k in args.draft_k.split(",")]
    plain = _engine("none", 1, None)
    loads = workloads(plain, count, max_tokens)
    widths = sorted({1, 2, 3, *(1 + k for k in ks + draft_ks)})
    cost = verify_cost_ms(plain, widths)
    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    for method, k in _configs(ks, draft_ks if args.draft_model else []):
        engine = _engine(method, k, args.draft_model)
        times = _instrument(engine)
        for load in loads:
            base, got = run_interleaved([plain, engine], load)
            identical = got["outputs"] == base["outputs"] if load.check_identical else None
            speedup = base["seconds"] / got["seconds"] * got["tokens"] / base["tokens"]
            rows.append([
                load.name, method, k, base["tok_s"], got["tok_s"], speedup,
                got["acceptance_rate"], got["fallbacks"], "-" if identical is None else identical,
            ])  # fmt: skip
            results.append({
                "workload": load.name, "method": method, "k": k, "speedup": speedup,
                "off_tok_s": base["tok_s"], "greedy_identical": identical,
                **_counters(got),
            })  # fmt: skip
        profiles[f"{method}-k{k}"] = times.summary()
        del engine
    print_table(
        [
            "workload",
            "method",
            "k",
            "off tok/s",
            "on tok/s",
            "speedup",
            "acceptance",
            "fallbacks",
            "identical",
        ],
        rows,
        title=f"batch-1, fp32 SmolLM2-135M, 1 thread, {count} prompts x {max_tokens} tokens",
    )
    _print_profiles(profiles)
    print_table(
        ["chunk tokens", "ms", "x decode"],
        [[w, ms, ms / cost[1]] for w, ms in cost.items()],
        title="forward + verify of one chunk at a 256-token context (1 = plain decode)",
    )
    save(
        "speculative",
        {
            **header,
            "max_tokens": max_tokens,
            "prompts_per_workload": count,
            "draft_model": args.draft_model,
            "rows": results,
            "step_profile_ms": profiles,
            "verify_cost_ms": cost,
        },
        args,
    )  # fmt: skip


def _print_profiles(profiles: dict[str, Any]) -> None:
    rows = []
    for name, kinds in profiles.items():
        for kind in ("decode", "verify"):
            p = kinds.get(kind)
            if p:
                rows.append([
                    name, kind, int(p["steps"]), p.get("schedule+propose", 0.0),
                    p.get("forward+verify", 0.0), p.get("update", 0.0),
                ])  # fmt: skip
    print_table(
        ["engine", "step", "steps", "schedule+propose ms", "forward+verify ms", "update ms"],
        rows,
        title="where a step's time goes (ms per step, both workloads)",
    )


if __name__ == "__main__":
    main()
