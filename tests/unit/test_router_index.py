"""PrefixIndex: events, predictions with expiry, and leading-prefix matching."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from common.hashing import ROOT_HASH, block_hashes
from common.kv_events import AllBlocksCleared, BlockEvicted, BlockStored
from router.index import PrefixIndex


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stored(index: PrefixIndex, worker: str, hashes: list[int]) -> None:
    parent = ROOT_HASH
    for i, h in enumerate(hashes):
        index.apply(worker, BlockStored(block_hash=h, parent_hash=parent, block_id=i))
        parent = h


CHAIN = block_hashes(list(range(64)), 16)  # 4 blocks


def test_match_counts_leading_blocks_per_worker() -> None:
    index = PrefixIndex()
    stored(index, "a", CHAIN)
    stored(index, "b", CHAIN[:2])
    assert index.match(CHAIN) == {"a": 4, "b": 2}
    assert index.match(CHAIN[:1]) == {"a": 1, "b": 1}
    assert index.match(block_hashes(list(range(1, 65)), 16)) == {}
    assert index.match([]) == {}


def test_a_gap_ends_the_match() -> None:
    index = PrefixIndex()
    stored(index, "a", CHAIN)
    index.apply("a", BlockEvicted(block_hash=CHAIN[1], block_id=1))
    # Block 2 is still cached, but the engine stops reusing at the first miss.
    assert index.match(CHAIN) == {"a": 1}


def test_eviction_and_clear() -> None:
    index = PrefixIndex()
    stored(index, "a", CHAIN)
    stored(index, "b", CHAIN)
    index.apply("a", BlockEvicted(block_hash=CHAIN[0], block_id=0))
    assert index.match(CHAIN) == {"b": 4}
    index.apply("b", AllBlocksCleared())
    assert index.match(CHAIN) == {}
    assert index.num_entries == 3  # a's blocks 1..3 remain, unreachable from the root
    index.apply("a", BlockEvicted(block_hash=12345, block_id=9))  # unknown: ignored


def test_predictions_expire_unless_confirmed() -> None:
    clock = Clock()
    index = PrefixIndex(prediction_ttl_s=5.0, clock=clock)
    index.predict("a", CHAIN)
    index.predict("b", CHAIN[:2])
    assert index.match(CHAIN) == {"a": 4, "b": 2}
    stored(index, "b", CHAIN[:1])  # the event confirms b's first block
    clock.now += 6.0
    assert index.match(CHAIN) == {"b": 1}
    assert index.num_entries == 1  # expired predictions were purged


def test_prediction_does_not_downgrade_a_confirmed_block() -> None:
    clock = Clock()
    index = PrefixIndex(prediction_ttl_s=1.0, clock=clock)
    stored(index, "a", CHAIN)
    index.predict("a", CHAIN)
    clock.now += 10
    assert index.match(CHAIN) == {"a": 4}


def test_repredicting_extends_the_expiry() -> None:
    clock = Clock()
    index = PrefixIndex(prediction_ttl_s=5.0, clock=clock)
    index.predict("a", CHAIN)
    clock.now += 4
    index.predict("a", CHAIN)
    clock.now += 4  # the first prediction's entries in the queue are stale, not the data
    assert index.match(CHAIN) == {"a": 4}
    clock.now += 2
    assert index.match(CHAIN) == {}


def test_eviction_removes_a_prediction() -> None:
    index = PrefixIndex()
    index.predict("a", CHAIN)
    index.apply("a", BlockEvicted(block_hash=CHAIN[0], block_id=0))
    assert index.match(CHAIN) == {}


def test_retain_forgets_departed_workers() -> None:
    index = PrefixIndex()
    stored(index, "a", CHAIN)
    stored(index, "b", CHAIN)
    index.retain({"b", "c"})
    assert index.match(CHAIN) == {"b": 4}
    assert index.num_entries == 4  # b's blocks only: nothing of a's is left


@given(
    holdings=st.dictionaries(
        st.sampled_from(["a", "b", "c"]),
        st.lists(st.integers(0, 7), max_size=8, unique=True),
    ),
    length=st.integers(0, 8),
)
def test_match_equals_a_brute_force_walk(holdings: dict[str, list[int]], length: int) -> None:
    chain = block_hashes(list(range(8 * 16)), 16)
    index = PrefixIndex()
    for worker, positions in holdings.items():
        for p in positions:
            index.apply(worker, BlockStored(block_hash=chain[p], parent_hash=0, block_id=p))
    expected = {}
    for worker, positions in holdings.items():
        depth = 0
        while depth < length and depth in positions:
            depth += 1
        if depth:
            expected[worker] = depth
    assert index.match(chain[:length]) == expected
