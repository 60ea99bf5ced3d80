"""FreeBlocks: extents stay maximal, allocations come out as few runs as the free space allows."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from common.sampling import SamplingParams
from engine.block_manager import RUN_EVICTION_MIN_BLOCKS, BlockManager
from engine.free_blocks import FreeBlocks
from engine.sequence import Sequence


def runs(ids: list[int]) -> int:
    """How many runs of consecutive ids ``ids`` is, in its order."""
    return sum(1 for i, block in enumerate(ids) if i == 0 or block != ids[i - 1] + 1)


def with_holes(num_blocks: int, holes: list[range]) -> FreeBlocks:
    """A FreeBlocks where exactly the ids in ``holes`` are free."""
    free = FreeBlocks(num_blocks)
    free.take(num_blocks)
    for hole in holes:
        for block in hole:
            free.put(block)
    free.check()
    return free


def test_a_fresh_set_hands_out_one_run_from_zero() -> None:
    free = FreeBlocks(100)
    assert free.take(5) == [0, 1, 2, 3, 4]
    assert free.take(3) == [5, 6, 7]
    assert len(free) == 92
    assert sorted(free.extents()) == [(8, 92)]


def test_best_fit_fills_the_shortest_hole_that_holds_the_request() -> None:
    free = with_holes(100, [range(10, 18), range(30, 33), range(50, 90)])
    assert free.take(3) == [30, 31, 32]  # the 3-hole, not the front of a bigger one
    assert free.take(6) == [10, 11, 12, 13, 14, 15]  # the 8-hole, the 40-hole kept whole
    assert sorted(free.extents()) == [(16, 2), (50, 40)]


def test_without_a_fitting_hole_the_longest_goes_first() -> None:
    free = with_holes(100, [range(0, 4), range(10, 16), range(20, 22)])
    taken = free.take(9)
    assert taken[:6] == list(range(10, 16))  # the longest whole ...
    assert taken[6:] == [0, 1, 2]  # ... then the best fit for the rest
    assert runs(taken) == 2


def test_a_growing_run_continues_past_its_last_block() -> None:
    free = with_holes(100, [range(3, 5), range(40, 60)])
    first = free.take(4, after=None)  # best fit would be elsewhere ...
    assert first == [40, 41, 42, 43]
    assert free.take(2, after=44) == [44, 45]  # ... and growth stays in the run
    assert free.take(1, after=10) == [3]  # 10 is not free: best fit
    free.check()


def test_released_ids_merge_into_maximal_extents() -> None:
    free = with_holes(20, [])
    for block in (5, 7, 6, 4, 8):  # out of order, joining on both sides
        free.put(block)
        free.check()
    assert list(free.extents()) == [(4, 5)]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 12)), max_size=60), st.randoms())
def test_random_takes_and_puts_agree_with_a_plain_set(
    ops: list[tuple[bool, int]], rng: random.Random
) -> None:
    free = FreeBlocks(64)
    model = set(range(64))
    for take, n in ops:
        if take and n <= len(model):
            extents = [length for _, length in free.extents()]
            got = free.take(n)
            assert len(got) == len(set(got)) == n and set(got) <= model
            if max(extents) >= n:  # one extent held it: one run
                assert runs(got) == 1
            model -= set(got)
        elif not take and len(model) < 64:
            used = sorted(set(range(64)) - model)
            for block in rng.sample(used, min(n, len(used))):
                free.put(block)
                model.add(block)
        free.check()
        assert set(free.ids()) == model and len(free) == len(model)


def test_block_manager_keeps_runs_under_steady_churn() -> None:
    """The engine's allocations stay long runs after thousands of requests, where a FIFO
    free list had decayed to runs of about one block (mean 1.1 after 3000)."""
    bm = BlockManager(num_blocks=1024, block_size=16)
    rng = random.Random(0)
    live: list[list[int]] = []
    for _ in range(3000):
        size = rng.randint(1, 64)
        while live and (bm.num_free_blocks < size + 256 or rng.random() < 0.4):
            bm.free_blocks(live.pop(rng.randrange(len(live))))
        live.append(bm.allocate_blocks(size))
    bm.check_invariants()
    blocks = sum(len(ids) for ids in live)
    assert blocks / sum(runs(ids) for ids in live) >= 8


def test_a_growing_sequence_extends_its_own_run() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    seq = Sequence("grow", list(range(8)), SamplingParams(), arrival=0)
    assert bm.append_slots(seq, 8) and seq.block_table == [0, 1]
    other = bm.allocate_blocks(1)  # block 2, released again: the oldest free id is now 3..
    bm.free_blocks(other)
    seq.num_computed_tokens = 8
    assert bm.append_slots(seq, 4) and seq.block_table == [0, 1, 2]  # .. but 2 continues
    bm.free(seq)
    bm.check_invariants()


def test_evicted_cached_blocks_come_back_as_runs() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    seqs = [Sequence(f"s{i}", list(range(i * 100, i * 100 + 64)), SamplingParams(), 0)
            for i in range(4)]  # fmt: skip
    for seq in seqs:  # 16 full blocks each: the whole cache
        bm.allocate_prefix(seq)
        assert bm.append_slots(seq, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
        bm.commit_computed(seq)
    for seq in seqs:
        bm.free(seq)
    assert bm.num_cached_blocks == 64 and len(bm._free) == 0
    got = bm.allocate_blocks(16)  # evicts the 16 oldest, s0's (released tail first) ...
    assert got == list(range(16))  # ... which merge back into one run
    bm.check_invariants()


def released_full_cache() -> BlockManager:
    """40 blocks of 4 tokens, filled by sequences s0..s3 (blocks 0-9, 10-19, ...: 9 full
    blocks and a partial one each), released in that order: 36 cached, 4 free holes."""
    bm = BlockManager(num_blocks=40, block_size=4)
    seqs = [Sequence(f"s{i}", list(range(i * 100, i * 100 + 37)), SamplingParams(), 0)
            for i in range(4)]  # fmt: skip
    for seq in seqs:
        bm.allocate_prefix(seq)
        assert bm.append_slots(seq, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
        bm.commit_computed(seq)
    assert [seq.block_table[0] for seq in seqs] == [0, 10, 20, 30]
    for seq in seqs:
        bm.free(seq)
    return bm


def test_a_long_allocation_evicts_a_window_rather_than_taking_holes() -> None:
    """A full cache of released sequences, each with its partial last block freed (a
    hole): a long allocation evicts the oldest sequence's window and comes out as one run,
    where taking the holes first would cut it into single blocks. Short ones still take
    the holes first, as strict LRU does."""
    bm = released_full_cache()
    assert len(bm._free) == 4  # the partial blocks 9, 19, 29, 39
    bm.take_events()
    assert bm.allocate_blocks(1) == [9]  # short: a hole, nothing evicted
    assert bm.take_events() == [] and bm.num_cached_blocks == 36
    got = bm.allocate_blocks(RUN_EVICTION_MIN_BLOCKS)
    assert runs(got) == 1 and set(got) <= set(range(9))  # in s0's blocks, the oldest
    evicted = bm.take_events()  # just the window: no more than it takes
    assert len(evicted) == RUN_EVICTION_MIN_BLOCKS
    assert {e.block_id for e in evicted} == set(got)
    bm.check_invariants()


def test_expect_places_a_first_chunk_where_the_rest_fits() -> None:
    free = with_holes(100, [range(10, 14), range(50, 90)])
    assert free.take(4, expect=12) == [50, 51, 52, 53]  # not the 4-hole: 8 more follow
    assert free.take(8, after=54) == list(range(54, 62))


def test_a_prompt_prefilled_in_chunks_is_one_run() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    hole = bm.allocate_blocks(4)  # blocks 0-3, a 4-block hole once released ...
    wall = bm.allocate_blocks(1)  # ... walled off by block 4
    bm.free_blocks(hole)
    seq = Sequence("long", list(range(48)), SamplingParams(), arrival=0)  # 12 blocks
    for _ in range(3):  # 16-token chunks: each would best-fit the hole on its own
        assert bm.append_slots(seq, 16)
        seq.num_computed_tokens += 16
    assert runs(seq.block_table) == 1 and seq.block_table[0] == 5
    bm.free(seq)
    bm.free_blocks(wall)
    bm.check_invariants()


def test_window_eviction_spares_recently_hit_blocks() -> None:
    """The window around the oldest cached block stops at a block that was hit recently
    (a shared prefix): only old blocks are evicted out of turn."""
    bm = released_full_cache()
    hot = Sequence("hot", [*range(8), 7777], SamplingParams(), 0)  # hits s0's blocks 0, 1
    bm.allocate_prefix(hot)
    assert hot.block_table == [0, 1]
    bm.free(hot)  # now the most recently released
    got = bm.allocate_blocks(RUN_EVICTION_MIN_BLOCKS)
    assert got == list(range(2, 10))  # s0's old blocks and its freed partial one
    assert bm.match_prefix(Sequence("again", [*range(8), 1], SamplingParams(), 0)) == 8
    bm.check_invariants()
