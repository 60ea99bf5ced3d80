"""Speculative decoding: n-gram proposals, the accept/resample rule, the fallback rule,
config validation, and engine-level greedy parity / no leaked KV block (fp32 engine)."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from common.sampling import SamplingParams
from engine.config import EngineConfig
from engine.speculative.ngram import propose_ngram
from engine.speculative.rejection import rejection_sample, verify_greedy
from engine.speculative.tracker import AcceptanceTracker
from tests.draft_model import write_self_draft

MODEL = os.path.expanduser("~/.cache/pdserve/models/SmolLM2-135M-Instruct")
NUM_BLOCKS = 128


# ---- proposals and the acceptance rule -------------------------------------------------


def test_ngram_proposes_what_followed_the_latest_match() -> None:
    tokens = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert propose_ngram(tokens, 2, 2, 3) == [7, 8]  # the latest "1 2 3" is followed by 7 8
    assert propose_ngram([1, 2, 3, 4], 3, 2, 3) == []  # no repeated tail
    assert propose_ngram([5, 6, 5, 6], 4, 1, 2) == [5, 6]  # stops at the end of the tokens


def test_verify_greedy_keeps_the_matching_prefix_then_the_target_token() -> None:
    assert verify_greedy([4, 5, 6, 7], [4, 5, 6]) == [4, 5, 6, 7]
    assert verify_greedy([4, 9, 6, 7], [4, 5, 6]) == [4, 9]
    assert verify_greedy([3, 5], [4]) == [3]


def _chi_square(counts: Counter[int], probs: torch.Tensor, draws: int) -> float:
    expected = probs * draws
    return float(sum((counts[i] - e) ** 2 / e for i, e in enumerate(expected.tolist()) if e > 0))


@pytest.mark.parametrize("one_hot", [True, False])
def test_rejection_sampling_keeps_the_target_distribution(one_hot: bool) -> None:
    vocab, draws = 6, 20000
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(2, vocab, generator=gen), dim=-1)  # 1 draft + bonus row
    q = torch.softmax(torch.randn(1, vocab, generator=gen), dim=-1)
    first: Counter[int] = Counter()
    for _ in range(draws):
        if one_hot:
            draft = [2]  # a deterministic proposer (n-gram)
            out = rejection_sample(p, draft, None, gen)
        else:
            draft = [int(torch.multinomial(q[0], 1, generator=gen))]
            out = rejection_sample(p, draft, q, gen)
        first[out[0]] += 1
    # 5 degrees of freedom: the 0.999 quantile is 20.5; a biased rule is far above it.
    assert _chi_square(first, p[0], draws) < 20.5
    biased = Counter({2: draws})  # accepting the draft always would fail the test
    assert _chi_square(biased, p[0], draws) > 100


def test_fallback_after_the_window_when_acceptance_stays_low() -> None:
    tracker = AcceptanceTracker(window=4, threshold=0.3, alpha=0.5)
    for _ in range(3):
        tracker.record("r", 4, 0)
    assert tracker.enabled("r")  # within the window
    tracker.record("r", 4, 0)
    assert not tracker.enabled("r")
    tracker.record("good", 4, 4)
    assert tracker.enabled("good")
    stats = tracker.stats()
    assert (stats.num_draft_tokens, stats.num_accepted_tokens, stats.num_fallbacks) == (20, 4, 1)
    assert stats.acceptance_rate == pytest.approx(0.2)


def test_fallback_pauses_then_probes_again_with_a_doubling_pause() -> None:
    tracker = AcceptanceTracker(window=4, threshold=0.3, alpha=0.5, backoff=3)
    for _ in range(4):
        assert tracker.take_turn("r")
        tracker.record("r", 2, 0)
    assert not tracker.enabled("r")
    assert [tracker.take_turn("r") for _ in range(4)] == [False, False, False, True]
    for _ in range(4):  # a fresh EWMA and window: four more failures to fall back again
        tracker.record("r", 2, 0)
    assert [tracker.take_turn("r") for _ in range(7)] == [False] * 6 + [True]
    assert tracker.stats().num_fallbacks == 2


def test_draft_length_doubles_on_full_acceptance_and_shrinks_on_rejection() -> None:
    tracker = AcceptanceTracker(width_quantum=1)
    assert tracker.draft_len("r", 8) == 8  # a new request drafts k
    tracker.record("r", 8, 2)
    assert tracker.draft_len("r", 8) == 3  # one more than it accepted
    tracker.record("r", 3, 3)
    assert tracker.draft_len("r", 8) == 7
    assert tracker.draft_len("r", 4) == 4  # never above k
    tracker.record("r", 7, 0)
    assert tracker.draft_len("r", 8) == 1


def test_draft_length_snaps_to_chunk_widths_that_cost_the_same() -> None:
    tracker = AcceptanceTracker(width_quantum=3)  # widths 3, 6, 9: 2, 5 or 8 drafts
    tracker.record("r", 8, 0)
    assert tracker.draft_len("r", 8) == 2  # the cheapest probe, not 1
    tracker.record("r", 2, 2)
    assert tracker.draft_len("r", 8) == 5
    tracker.record("r", 5, 5)
    assert tracker.draft_len("r", 8) == 8
    tracker.record("r", 8, 6)
    assert tracker.draft_len("r", 8) == 5  # 7 snapped down to width 6
    fixed = AcceptanceTracker(adaptive=False)
    fixed.record("r", 8, 0)
    assert fixed.draft_len("r", 8) == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"speculative_method": "medusa"}, "speculative_method must be one of"),
        ({"speculative_method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"speculative_method": "draft"}, "needs draft_model"),
        ({"prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ],
)
def test_config_rejects_bad_speculative_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


# ---- the engine ------------------------------------------------------------------------


def _engine(method: str = "ngram", **kwargs: object):
    from engine.llm_engine import LLMEngine

    config = EngineConfig(
        model=MODEL,
        dtype="float32",
        num_kv_blocks=NUM_BLOCKS,
        speculative_method=method,
        **kwargs,
    )
    return LLMEngine(config)


PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef",
    "Copy this list: apples, pears, plums, apples, pears, plums, apples,",
    "Qz vortex marble 93 lantern; quiet ribbon, seventeen hollow kites",  # random-ish
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
]


def _run(engine, requests: list[tuple[str, list[int], SamplingParams]]) -> dict[str, list[int]]:
    for request_id, tokens, params in requests:
        engine.add_request(request_id, tokens, params)
    out: dict[str, list[int]] = {r[0]: [] for r in requests}
    while engine.has_unfinished():
        for step in engine.step():
            out[step.request_id].extend(step.new_token_ids)
    return out


def test_greedy_parity_alone_and_in_a_mixed_batch_of_16() -> None:
    plain, spec = _engine("none"), _engine("ngram")
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    opt_out = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, speculative=False)
    prompts = [plain.encode(p) for p in PROMPTS]
    alone = [(f"a{i}", p, greedy) for i, p in enumerate(prompts)]
    reference = _run(plain, alone)
    assert _run(spec, alone) == reference
    assert spec.speculative_stats().num_accepted_tokens > 0
    batch = [(f"b{i}", prompts[i % len(prompts)], greedy if i % 2 else opt_out) for i in range(16)]
    got = _run(spec, batch)
    for i in range(16):
        assert got[f"b{i}"] == reference[f"a{i % len(prompts)}"], i
    assert spec.block_manager.num_free_blocks == NUM_BLOCKS


def test_stop_token_drops_the_accepted_tokens_after_it() -> None:
    spec = _engine("ngram")
    tokens = spec.encode(PROMPTS[0])
    full = _run(spec, [("f", tokens, SamplingParams(max_tokens=24, temperature=0.0))])["f"]
    stop = full[5]
    first = full.index(stop)
    params = SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=(stop,))
    assert _run(spec, [("s", tokens, params)])["s"] == full[: first + 1]


def test_random_add_abort_step_workload_leaks_no_block() -> None:
    spec = _engine("ngram", max_num_batched_tokens=64)
    rng = random.Random(7)
    prompts = [spec.encode(p) for p in PROMPTS]
    live: list[str] = []
    for step in range(120):
        action = rng.random()
        if action < 0.25:
            request_id = f"r{step}"
            params = SamplingParams(
                max_tokens=rng.randint(1, 30),
                temperature=rng.choice([0.0, 0.8]),
                seed=rng.randint(0, 9),
                ignore_eos=True,
            )
            spec.add_request(request_id, rng.choice(prompts), params)
            live.append(request_id)
        elif action < 0.4 and live:
            spec.abort(live.pop(rng.randrange(len(live))))  # often mid-verification
        else:
            for out in spec.step():
                if out.finished and out.request_id in live:
                    live.remove(out.request_id)
        spec.block_manager.check_invariants()
    for request_id in live:
        spec.abort(request_id)
    assert spec.block_manager.num_free_blocks == NUM_BLOCKS
    assert spec.speculative_stats().num_verify_steps > 0
    assert spec.speculator.tracker.num_tracked == 0


def test_seeded_sampling_with_speculation_is_reproducible() -> None:
    spec = _engine("ngram")
    tokens = spec.encode(PROMPTS[1])
    params = SamplingParams(max_tokens=20, temperature=0.7, seed=3, ignore_eos=True)
    first = _run(spec, [("x", tokens, params)])["x"]
    assert _run(spec, [("y", tokens, params)])["y"] == first


DISTRIBUTION_PROMPT = "apples, pears, plums, apples, pears, plums, apples, pears, plums, apples,"
DISTRIBUTION_PARAMS = [
    SamplingParams(max_tokens=3, temperature=1.0, top_k=4, seed=s, ignore_eos=True)
    for s in range(240)
]


def _second_tokens(engine) -> Counter[int]:
    """Counts of the 2nd generated token (the first one a verify chunk can produce)."""
    tokens = engine.encode(DISTRIBUTION_PROMPT)
    out = _run(engine, [(f"q{i}", tokens, p) for i, p in enumerate(DISTRIBUTION_PARAMS)])
    return Counter(t[1] for t in out.values())


@pytest.fixture(scope="module")
def plain_second_tokens() -> Counter[int]:
    return _second_tokens(_engine("none", max_num_seqs=64))


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_engine_sampling_distribution_matches_plain_decoding(
    method: str, plain_second_tokens: Counter[int], tmp_path: Path
) -> None:
    """Marginal of the 2nd generated token over many seeded requests, with and without
    speculation (n-gram; a two-layer self-draft): a two-sample chi-square test."""
    extra = {}
    if method == "draft":
        extra["draft_model"] = str(write_self_draft(tmp_path / "draft", [0, 1]))
    engine = _engine(method, max_num_seqs=64, **extra)
    counts = [plain_second_tokens, _second_tokens(engine)]
    assert engine.speculative_stats().num_verify_steps > 0
    keys = set(counts[0]) | set(counts[1])
    stat = sum((counts[0][k] - counts[1][k]) ** 2 / (counts[0][k] + counts[1][k]) for k in keys)
    # <= ~16 categories; a loose bound (p ~ 1e-4) that a systematic bias still exceeds.
    assert stat < 45, (stat, counts)
