"""Speculative decoding with a draft model (speculative_method="draft"), fp32 engine.

The drafts are self-drafts of the default model (tests/draft_model.py): a *partial* one
(the first 28 of 30 layers: it agrees with the target some of the time, so verify steps
accept some drafts and roll the rest back) and a *shallow* one (two layers: almost always
rejected). Checks: greedy parity alone and in a mixed batch of 16, fallback frees the draft
KV, no leaked block in either KV cache under a random add/abort/step workload, and clear
start-up errors. The sampled-distribution test of the draft method is in
test_speculative.py (it shares the plain engine's counts with the n-gram one).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from common.sampling import SamplingParams
from engine.model_loader import ModelLoadError
from tests.draft_model import swap_two_tokens, write_self_draft
from tests.unit.test_speculative import MODEL, NUM_BLOCKS, PROMPTS, _engine, _run

PARTIAL_LAYERS = list(range(28))  # agrees with the target ~25% of the time
SHALLOW_LAYERS = [0, 1]


@pytest.fixture(scope="module")
def drafts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("drafts")
    return {
        "partial": str(write_self_draft(root / "partial", PARTIAL_LAYERS)),
        "shallow": str(write_self_draft(root / "shallow", SHALLOW_LAYERS)),
    }


def _draft_engine(draft: str, never_fall_back: bool = True, **kwargs: object):
    engine = _engine("draft", draft_model=draft, **kwargs)
    if never_fall_back:  # keep verifying every step, to exercise the rollback path
        engine.speculator.tracker.window = 10**9
    return engine


def _draft_blocks(engine):
    return engine.speculator.proposer.block_manager


GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference() -> tuple[list[list[int]], dict[str, list[int]]]:
    """The prompts (token ids) and the plain engine's greedy output for each, alone."""
    plain = _engine("none")
    prompts = [plain.encode(p) for p in PROMPTS]
    return prompts, _run(plain, [(f"a{i}", p, GREEDY) for i, p in enumerate(prompts)])


def test_greedy_parity_alone_with_partial_agreement(drafts: dict[str, str], reference) -> None:
    prompts, expected = reference
    spec = _draft_engine(drafts["partial"], num_speculative_tokens=3)
    assert _run(spec, [(f"a{i}", p, GREEDY) for i, p in enumerate(prompts)]) == expected
    stats = spec.speculative_stats()
    # Partial agreement: some drafts accepted, some rolled back.
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens, stats
    assert _draft_blocks(spec).num_free_blocks == NUM_BLOCKS
    assert spec.speculator.proposer.num_tracked == 0


def test_greedy_parity_in_a_mixed_batch_of_16(drafts: dict[str, str], reference) -> None:
    """Draft-speculating requests beside opted-out ones, every draft step rolled back."""
    prompts, expected = reference
    spec = _draft_engine(drafts["shallow"], num_speculative_tokens=2)
    opt_out = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, speculative=False)
    batch = [(f"b{i}", prompts[i % len(prompts)], GREEDY if i % 2 else opt_out) for i in range(16)]
    got = _run(spec, batch)
    for i in range(16):
        assert got[f"b{i}"] == expected[f"a{i % len(prompts)}"], i
    assert spec.speculative_stats().num_verify_steps >= 8 * 20
    assert spec.block_manager.num_free_blocks == NUM_BLOCKS
    assert _draft_blocks(spec).num_free_blocks == NUM_BLOCKS


def test_shallow_draft_falls_back_and_frees_its_draft_kv(drafts: dict[str, str], reference) -> None:
    prompts, expected = reference
    spec = _draft_engine(drafts["shallow"], never_fall_back=False)
    spec.add_request("f", prompts[2], GREEDY)
    out: list[int] = []
    freed_mid_request = False
    while spec.has_unfinished():
        for step in spec.step():
            out.extend(step.new_token_ids)
        if spec.speculative_stats().num_fallbacks and spec.has_unfinished():
            freed_mid_request |= _draft_blocks(spec).num_free_blocks == NUM_BLOCKS
    assert out == expected["a2"]
    assert freed_mid_request  # fell back, and its draft KV was freed before it finished
    assert spec.speculator.proposer.num_tracked == 0


def test_random_add_abort_step_workload_leaks_no_block_in_either_cache(
    drafts: dict[str, str],
) -> None:
    spec = _draft_engine(drafts["shallow"], max_num_batched_tokens=64, num_speculative_tokens=2)
    draft_blocks = _draft_blocks(spec)
    rng = random.Random(11)
    prompts = [spec.encode(p) for p in PROMPTS]
    live: list[str] = []
    for step in range(60):
        action = rng.random()
        if action < 0.3:
            request_id = f"r{step}"
            params = SamplingParams(
                max_tokens=rng.randint(1, 24),
                temperature=rng.choice([0.0, 0.8]),
                seed=rng.randint(0, 9),
                ignore_eos=True,
            )
            spec.add_request(request_id, rng.choice(prompts), params)
            live.append(request_id)
        elif action < 0.45 and live:
            spec.abort(live.pop(rng.randrange(len(live))))  # often mid-verification
        else:
            for out in spec.step():
                if out.finished and out.request_id in live:
                    live.remove(out.request_id)
        spec.block_manager.check_invariants()
        draft_blocks.check_invariants()
    for request_id in live:
        spec.abort(request_id)
    assert spec.speculative_stats().num_verify_steps > 0
    assert spec.block_manager.num_free_blocks == NUM_BLOCKS
    assert draft_blocks.num_free_blocks == NUM_BLOCKS
    assert spec.speculator.proposer.num_tracked == 0


def test_missing_draft_path_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match=r"draft_model: model path .* does not exist"):
        _engine("draft", draft_model="/nonexistent/draft")


def test_draft_with_another_vocab_size_is_refused(tmp_path: Path) -> None:
    draft = write_self_draft(tmp_path / "d", SHALLOW_LAYERS, vocab_size=50000)
    with pytest.raises(ModelLoadError, match="vocab_size 50000; the target model has 49152"):
        _engine("draft", draft_model=str(draft))


def test_draft_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    draft = write_self_draft(tmp_path / "d", SHALLOW_LAYERS)
    swap_two_tokens(draft)
    with pytest.raises(ModelLoadError, match="different tokenizer"):
        _engine("draft", draft_model=str(draft))


def test_self_draft_helper_keeps_the_chosen_layers(tmp_path: Path) -> None:
    from safetensors import safe_open

    draft = write_self_draft(tmp_path / "d", [3, 29])
    with (
        safe_open(str(draft / "model.safetensors"), framework="pt") as kept,
        safe_open(str(Path(MODEL) / "model.safetensors"), framework="pt") as full,
    ):
        assert kept.get_tensor("model.layers.1.mlp.up_proj.weight").equal(
            full.get_tensor("model.layers.29.mlp.up_proj.weight")
        )
        assert not any(name.startswith("model.layers.2.") for name in kept.keys())  # noqa: SIM118
