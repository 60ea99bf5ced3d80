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


# ---- the cap, memory, retired workers, shared prefixes -----------------------------------------


def test_the_cap_evicts_least_recently_used_blocks() -> None:
    clock = Clock()
    index = PrefixIndex(prediction_ttl_s=60.0, clock=clock, max_entries=8)
    a, b = CHAIN, block_hashes(list(range(100, 164)), 16)
    stored(index, "a", a)
    stored(index, "b", b)
    assert index.num_entries == 8 and index.evicted == 0
    index.predict("a", a)  # a's prefix is used again: now the most recent
    index.predict("c", block_hashes(list(range(500, 516)), 16))  # the 9th entry
    assert index.num_entries <= 8 and index.evicted >= 1
    assert index.match(a) == {"a": 4}  # recently used: kept
    assert index.match(b) == {}  # b's first block, the least recently used, went first
    for i in range(100):  # the cap holds under any number of inserts
        index.predict("d", block_hashes([1000 + i, *range(15)], 16))
    assert index.num_entries <= 8


def test_memory_estimate_tracks_real_allocations() -> None:
    import tracemalloc

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = PrefixIndex(max_entries=100_000)
    for doc in range(400):  # 400 chains x 64 blocks, each held by two workers
        chain = [hash((doc, i)) & (2**64 - 1) for i in range(64)]
        stored(index, f"p{doc % 10}", chain)
        stored(index, f"d{doc % 7}", chain)
    real = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert index.num_entries == 400 * 64 * 2
    assert 0.6 < index.approx_bytes / real < 1.6, (index.approx_bytes, real)


def test_a_departed_worker_is_forgotten_at_once_and_reclaimed_lazily() -> None:
    index = PrefixIndex(max_entries=6)
    stored(index, "a", CHAIN)
    stored(index, "b", CHAIN[:2])
    index.retain({"b"})
    assert index.num_entries == 2 and index.match(CHAIN) == {"b": 2}
    assert index.num_blocks == 4  # a's entries linger until reused or evicted
    stored(index, "a", CHAIN[:1])  # a came back (cleared): only what it stores again counts
    assert index.match(CHAIN) == {"b": 2, "a": 1}
    stored(index, "c", block_hashes(list(range(300, 364)), 16))  # pushes the cap
    assert index.num_entries <= 6


def test_a_prefix_shared_by_many_workers_credits_them_all_without_walking_each() -> None:
    index = PrefixIndex(max_match_workers=4)
    system = CHAIN[:2]
    for w in range(20):
        stored(index, f"w{w}", system)
    stored(index, "w3", CHAIN)  # w3 also holds the rest of the conversation
    matched = index.match(CHAIN)
    assert dict(matched) == {"w3": 4}  # the one followed worker by worker
    assert matched.get("w7") == 2 and matched["w11"] == 2  # the wide part, by lookup
    assert matched.get("nobody", 0) == 0
    from router.policies import RouteQuery

    query = RouteQuery(num_tokens=100, max_tokens=8, block_size=16, matched_blocks=matched)
    assert query.cached_tokens("w7") == 32 and query.cached_tokens("w3") == 64
    index.retain({f"w{w}" for w in range(10)})  # w10..w19 left
    assert index.match(CHAIN).get("w15") is None


def test_predictions_of_a_departed_worker_expire_cleanly() -> None:
    clock = Clock()
    index = PrefixIndex(prediction_ttl_s=1.0, clock=clock)
    index.predict("a", CHAIN)
    index.drop_worker("a")
    clock.now += 2.0
    assert index.match(CHAIN) == {}
    assert index.num_entries == 0 and index.num_blocks == 0


def test_the_cap_comes_from_the_router_config() -> None:
    import pytest

    from router.config import RouterConfig
    from router.server import RouterServer

    config = RouterConfig.from_mapping(
        {"redis_url": "redis://127.0.0.1:1/0", "max_indexed_blocks": 1234}
    )
    assert RouterServer(config).indexes["default"].max_entries == 1234
    with pytest.raises(ValueError, match="max_indexed_blocks"):
        RouterConfig.from_mapping({"max_indexed_blocks": 0})


def test_a_big_sharded_index_keeps_its_cap_and_its_recent_blocks() -> None:
    index = PrefixIndex(max_entries=131_072)  # two shards, each its own LRU
    chains = [[hash((doc, i)) & (2**64 - 1) for i in range(64)] for doc in range(2500)]
    for chain in chains:
        index.predict("a", chain)
    assert index.num_entries <= 131_072 < 2500 * 64
    assert index.evicted == 2500 * 64 - index.num_entries
    assert index.match(chains[-1]) == {"a": 64}  # the most recent survive
    assert index.match(chains[0]) == {}  # the oldest went first


def test_expired_predictions_never_match_though_lookups_purge_only_a_few() -> None:
    clock = Clock()
    index = PrefixIndex(prediction_ttl_s=1.0, clock=clock)
    chain = block_hashes(list(range(100 * 16)), 16)  # 100 blocks
    index.predict("a", chain)
    stored(index, "b", chain[:50])
    clock.now += 2.0
    assert index.match(chain) == {"b": 50}  # a's 100 predictions expired
    assert index.match(chain[60:]) == {}  # ... deep ones too, still queued for purging
    assert 50 < index.num_entries < 150  # a lookup purges a few at a time
    index.predict("c", chain[:1])  # the next prediction purges the rest
    assert index.num_entries == 51
