"""The simulator's block pool follows engine/block_manager.py's rules, op for op."""

from __future__ import annotations

import random

import pytest

from capacity.sim.blocks import BlockPool
from common.hashing import block_hashes
from common.kv_events import BlockEvicted, BlockStored
from common.sampling import SamplingParams
from engine.block_manager import BlockManager
from engine.sequence import Sequence

BLOCK = 4


def _prompts(rng: random.Random, n: int) -> list[list[int]]:
    """Prompts over a few shared prefixes, so hits, duplicates and evictions all happen."""
    heads = [[rng.randrange(50) for _ in range(rng.randint(4, 24))] for _ in range(4)]
    out = []
    for _ in range(n):
        tail = [rng.randrange(50) for _ in range(rng.randint(1, 14))]
        out.append(rng.choice(heads)[: rng.randint(0, 24)] + tail)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_same_hits_frees_and_events_as_the_real_block_manager(seed: int) -> None:
    rng = random.Random(seed)
    real = BlockManager(24, BLOCK, run_eviction_min_blocks=10**9)  # strict LRU, as modelled
    model = BlockPool(24, BLOCK)
    events: list[tuple[bool, int]] = []
    model.listener = lambda stored, h: events.append((stored, h))
    live: list[tuple[Sequence, object]] = []
    hits = evictions = refusals = 0
    for i, prompt in enumerate(_prompts(rng, 120)):
        if live and (rng.random() < 0.5 or len(live) > 3):
            seq, holding = live.pop(rng.randrange(len(live)))
            real.free(seq)
            model.release(holding)  # type: ignore[arg-type]
        else:
            seq = Sequence(f"s{i}", prompt, SamplingParams(), i)
            hashes = block_hashes(prompt, BLOCK)
            assert real.match_prefix(seq) == model.match(hashes, len(prompt)) * BLOCK
            need = -(-len(prompt) // BLOCK)
            fits = model.can_allocate(hashes, len(prompt), need)
            real.allocate_prefix(seq)
            grown = real.append_slots(seq, len(prompt) - seq.num_computed_tokens)
            assert grown == fits
            if not grown:
                refusals += 1
                real.free(seq)
                continue
            hits += seq.num_cached_tokens > 0
            holding = model.allocate(hashes, len(prompt), need)
            assert len(holding.cached) * BLOCK == seq.num_cached_tokens
            seq.num_computed_tokens = len(prompt)
            real.commit_computed(seq)
            model.commit(holding, hashes)
            live.append((seq, holding))
        assert real.num_free_blocks == model.num_free_blocks
        assert real.num_cached_blocks == model.num_cached_blocks
        expected = [
            (isinstance(e, BlockStored), e.block_hash)
            for e in real.take_events()
            if isinstance(e, BlockStored | BlockEvicted)
        ]
        assert events == expected
        evictions += sum(not stored for stored, _ in events)
        events.clear()
    assert hits and evictions  # the sequence exercised both rules
