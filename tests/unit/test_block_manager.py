"""BlockManager: refcounts, prefix cache hits, LRU eviction, events, misuse detection."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.hashing import ROOT_HASH, block_hashes
from common.kv_events import BlockEvicted, BlockStored
from common.sampling import SamplingParams
from engine.block_manager import BlockManager, DoubleFreeError, NoFreeBlocksError
from engine.sequence import Sequence


def make_seq(request_id: str, tokens: list[int]) -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams(), arrival=0)


def compute(bm: BlockManager, seq: Sequence) -> None:
    """Admit ``seq`` and pretend the model computed every token of it."""
    bm.allocate_prefix(seq)
    assert bm.append_slots(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_computed(seq)


def test_prefix_hit_across_sequences_reuses_full_blocks() -> None:
    bm = BlockManager(num_blocks=64, block_size=16)
    prefix = list(range(1000, 1200))  # 200 tokens: 12 full blocks + 8
    first = make_seq("a", prefix)
    compute(bm, first)
    first_blocks = list(first.block_table)
    bm.free(first)
    assert bm.num_used_blocks == 0
    assert bm.num_cached_blocks == 12

    second = make_seq("b", [*prefix, 1, 2, 3])
    assert bm.match_prefix(second) == 192
    bm.allocate_prefix(second)
    assert second.num_computed_tokens == second.num_cached_tokens == 192
    assert second.block_table == first_blocks[:12]
    assert all(bm.ref_count(block) == 1 for block in second.block_table)
    bm.check_invariants(live=[second])


def test_commit_emits_stored_events_with_the_shared_hash_chain() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq("a", list(range(10)))  # 2 full blocks + 2 tokens
    compute(bm, seq)
    events = bm.take_events()
    hashes = block_hashes(seq.prompt_token_ids, 4)
    assert events == [
        BlockStored(hashes[0], ROOT_HASH, seq.block_table[0]),
        BlockStored(hashes[1], hashes[0], seq.block_table[1]),
    ]
    assert bm.take_events() == []  # drained

    # Decode fills the third block one token at a time; it is stored only once full.
    def decode_one(token: int) -> None:
        seq.output_token_ids.append(token)  # sampled last step; its KV is computed now
        assert bm.append_slots(seq, 1)
        seq.num_computed_tokens += 1
        bm.commit_computed(seq)

    decode_one(10)
    assert bm.take_events() == []  # 11 computed tokens: block 2 still partial
    decode_one(11)
    third = block_hashes(seq.all_token_ids, 4)[2]
    assert bm.take_events() == [BlockStored(third, hashes[1], seq.block_table[2])]
    decode_one(12)
    assert bm.take_events() == []


def test_match_prefix_leaves_one_token_to_compute_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    compute(bm, make_seq("a", list(range(9))))  # caches blocks [0..3], [4..7]
    bm.take_events()
    free_before = bm.num_free_blocks

    exact = make_seq("b", list(range(8)))  # both blocks cached, but one token must run
    assert bm.match_prefix(exact) == 4
    assert bm.num_free_blocks == free_before
    assert bm.take_events() == []
    assert exact.block_table == [] and exact.num_computed_tokens == 0

    diverging = make_seq("c", [0, 1, 2, 3, 4, 5, 6, 99, 8])  # second block differs
    assert bm.match_prefix(diverging) == 4
    assert bm.match_prefix(make_seq("d", [9, *range(1, 9)])) == 0


def test_lru_eviction_order_and_events() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq("a", [0, 1, 2, 3, 100])  # block 0 full (cached), block 1 partial
    b = make_seq("b", [10, 11, 12, 13, 200])  # block 2 full (cached), block 3 partial
    compute(bm, a)
    compute(bm, b)
    assert (a.block_table, b.block_table) == ([0, 1], [2, 3])
    (hash_a,), (hash_b,) = block_hashes(a.all_token_ids, 4), block_hashes(b.all_token_ids, 4)
    bm.free(a)
    bm.free(b)
    bm.take_events()

    # Never-used and uncached blocks go first: no eviction yet.
    assert bm.allocate_blocks(2) == [1, 3]
    assert bm.take_events() == []
    assert bm.num_cached_blocks == 2

    # A hit on a's block makes it the most recently used once released again, so b's
    # block, released later than a's the first time, is now the eviction candidate.
    c = make_seq("c", [0, 1, 2, 3, 55])
    bm.allocate_prefix(c)
    assert c.block_table == [0]
    bm.free(c)

    assert bm.allocate_blocks(1) == [2]
    assert bm.take_events() == [BlockEvicted(hash_b, 2)]
    assert bm.allocate_blocks(1) == [0]
    assert bm.take_events() == [BlockEvicted(hash_a, 0)]
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 0
    assert bm.match_prefix(make_seq("d", [0, 1, 2, 3, 4])) == 0
    bm.check_invariants()


def test_reverse_free_evicts_a_sequence_tail_before_its_head() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    seq = make_seq("a", [1, 2, 3, 4, 5, 6, 7])  # three full blocks + one partial
    compute(bm, seq)
    head = seq.block_table[0]
    bm.free(seq)
    bm.take_events()
    evicted = bm.allocate_blocks(3)  # the partial block, then two cached ones
    assert head not in evicted
    assert bm.match_prefix(make_seq("b", [1, 2, 3])) == 2


def test_shared_blocks_are_refcounted() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq("a", list(range(12)))
    compute(bm, a)
    b = make_seq("b", [*range(8), 70, 71, 72, 73, 74])
    bm.allocate_prefix(b)
    shared = a.block_table[:2]
    assert b.block_table == shared
    assert [bm.ref_count(block) for block in shared] == [2, 2]
    bm.check_invariants(live=[a, b])

    bm.free(a)
    assert [bm.ref_count(block) for block in shared] == [1, 1]
    assert bm.num_used_blocks == 2  # a's third block is evictable, the shared two are held
    bm.free(b)
    assert bm.num_used_blocks == 0
    assert bm.num_cached_blocks == 3  # all of a's full blocks stay hittable
    bm.check_invariants(live=[])


def test_duplicate_block_keeps_the_first_mapping() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq("a", list(range(5))), make_seq("b", list(range(5)))
    for seq in (a, b):  # both admitted before either computed: no hit for b
        bm.allocate_prefix(seq)
        assert bm.append_slots(seq, 5)
    for seq in (a, b):
        seq.num_computed_tokens = 5
        bm.commit_computed(seq)
    assert bm.take_events() == [BlockStored(block_hashes(range(4), 4)[0], ROOT_HASH, 0)]
    bm.free(b)  # b's duplicate of block 0 is uncached: straight back to the free list
    assert bm.num_cached_blocks == 1
    bm.free(a)
    assert bm.match_prefix(make_seq("c", list(range(6)))) == 4
    bm.check_invariants(live=[])


def test_double_free_raises_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    blocks = bm.allocate_blocks(2)
    bm.free_blocks(blocks)
    with pytest.raises(DoubleFreeError):
        bm.free_blocks(blocks)
    with pytest.raises(DoubleFreeError):
        bm.free_blocks([bm.allocate_blocks(1)[0]] * 2)  # one ref, released twice
    assert bm.num_used_blocks == 1
    bm.check_invariants()

    a = make_seq("a", list(range(6)))
    compute(bm, a)
    alias = make_seq("alias", a.prompt_token_ids)
    alias.block_table = list(a.block_table)  # a bug elsewhere: two owners, one reference
    bm.free(a)
    with pytest.raises(DoubleFreeError):
        bm.free(alias)
    assert alias.block_table  # left untouched for debugging
    bm.check_invariants()
    bm.free(a)  # an empty table frees nothing: repeated free of a seq is harmless
    with pytest.raises(ValueError):
        bm.free_blocks([99])


def test_out_of_blocks_allocates_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate_blocks(4)
    assert bm.num_free_blocks == 3
    seq = make_seq("a", list(range(13)))  # needs 4 blocks
    assert bm.blocks_needed(seq, 13) == 4
    assert not bm.can_allocate(4)
    assert not bm.append_slots(seq, 13)
    assert seq.block_table == [] and bm.num_free_blocks == 3
    assert bm.append_slots(seq, 12)
    assert bm.blocks_needed(seq, 12) == 0
    seq.num_computed_tokens = 12
    assert bm.blocks_needed(seq, 1) == 1
    bm.check_invariants(live=[seq])


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_seq("a", list(range(9)))
    compute(bm, a)
    assert bm.take_events() == [] and bm.num_cached_blocks == 0
    bm.free(a)
    assert bm.match_prefix(make_seq("b", list(range(9)))) == 0
    bm.check_invariants(live=[])


def test_allocate_prefix_requires_an_empty_seq() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq("a", list(range(6)))
    compute(bm, seq)
    with pytest.raises(ValueError):
        bm.allocate_prefix(seq)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.booleans(),  # True: admit a sequence; False: free the oldest live one
            st.sampled_from([(), (1, 2, 3), (1, 2, 3, 4, 5, 6), (7, 8, 9, 1)]),
            st.lists(st.integers(1, 3), max_size=8),
        ),
        max_size=40,
    )
)
def test_random_workload_never_serves_wrong_kv(
    ops: list[tuple[bool, tuple[int, ...], list[int]]],
) -> None:
    """Shadow every block's KV by the token ids written into it: a prefix hit must return
    blocks whose content is exactly the hitting sequence's tokens."""
    bm = BlockManager(num_blocks=10, block_size=3)
    shadow: dict[int, list[int | None]] = {}
    live: list[Sequence] = []
    for n, (admit, prefix, tail) in enumerate(ops):
        if admit:
            seq = make_seq(str(n), [*prefix, *tail] or [0])
            bm.allocate_prefix(seq)
            for pos in range(seq.num_computed_tokens):
                block = shadow[seq.block_table[pos // 3]]
                assert block[pos % 3] == seq.prompt_token_ids[pos]
            if bm.append_slots(seq, seq.num_tokens - seq.num_computed_tokens):
                for pos in range(seq.num_computed_tokens, seq.num_tokens):
                    shadow.setdefault(seq.block_table[pos // 3], [None] * 3)[pos % 3] = (
                        seq.prompt_token_ids[pos]
                    )
                seq.num_computed_tokens = seq.num_tokens
                bm.commit_computed(seq)
                live.append(seq)
            else:
                bm.free(seq)
        elif live:
            bm.free(live.pop(0))
        bm.check_invariants(live=live)
    for seq in live:
        bm.free(seq)
    assert bm.num_used_blocks == 0
    bm.check_invariants(live=[])
