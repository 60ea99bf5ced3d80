"""capacity/traffic.py: parsing, determinism, distributions and prefix block hashes."""

from __future__ import annotations

import random
import statistics

import pytest

from capacity.traffic import LengthDist, Traffic, generate

BASE = {
    "duration_s": 200,
    "rate": 20,
    "input_tokens": {"dist": "lognormal", "mean": 400, "sd": 100},
    "output_tokens": {"dist": "uniform", "low": 10, "high": 30},
    "prefix": {"groups": 3, "shared_tokens": 64, "fraction": 0.5},
    "block_size": 16,
    "seed": 7,
}


def test_same_seed_same_requests_other_seed_differs() -> None:
    traffic = Traffic.from_mapping(BASE)
    assert generate(traffic) == generate(traffic)
    assert generate(traffic) != generate(traffic, seed=8)


def test_rate_and_lengths_match_the_description() -> None:
    requests = generate(Traffic.from_mapping(BASE))
    assert 0.9 * 4000 < len(requests) < 1.1 * 4000
    assert statistics.mean(r.prompt_tokens for r in requests) == pytest.approx(400, rel=0.05)
    assert {r.output_tokens for r in requests} <= set(range(10, 31))
    assert all(len(r.block_hashes) == r.prompt_tokens // 16 for r in requests)


def test_piecewise_rate_shapes_arrivals() -> None:
    requests = generate(Traffic.from_mapping({**BASE, "rate": [[0, 5], [100, 40]]}))
    early = sum(r.arrival_s < 100 for r in requests)
    assert 8 * 0.7 < (len(requests) - early) / early < 8 * 1.3


def test_prefix_groups_share_leading_hashes() -> None:
    requests = generate(Traffic.from_mapping(BASE))
    firsts = [r.block_hashes[:4] for r in requests]
    shared = [f for f in firsts if firsts.count(f) > 1]
    assert len(set(shared)) == 3  # one chain per group
    assert 0.4 < len(shared) / len(requests) < 0.6


def test_bad_descriptions_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown keys"):
        Traffic.from_mapping({**BASE, "rat": 1})
    with pytest.raises(ValueError, match="dist must be"):
        LengthDist.parse({"dist": "zipf"}, "input_tokens")
    assert (
        LengthDist.parse({"dist": "empirical", "values": [5]}, "x").sampler(random.Random(0))() == 5
    )


def test_without_suffix_hashes_only_the_shared_prefix_is_hashed() -> None:
    full = generate(Traffic.from_mapping(BASE))
    short = generate(Traffic.from_mapping({**BASE, "suffix_hashes": False}))
    shared = [r for r in short if r.block_hashes]
    assert all(len(r.block_hashes) == 64 // 16 <= r.prompt_tokens // 16 for r in shared)
    assert 0.4 < len(shared) / len(short) < 0.6
    # the same three group chains as with suffix hashes
    chains = {r.block_hashes[:4] for r in full}
    assert {r.block_hashes for r in shared} <= chains and len({r.block_hashes for r in shared}) == 3
