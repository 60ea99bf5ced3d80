"""capacity.trace: our JSONL and the Mooncake format become SimRequests with real chains."""

from __future__ import annotations

import json

import pytest

from capacity.sim import SimRequest
from capacity.trace import load_trace, mooncake_chain, parse_lines


def _line(**row: object) -> str:
    return json.dumps(row)


def test_jsonl_prefix_groups_share_exactly_their_prefix_blocks() -> None:
    lines = [
        _line(arrival_s=1.0, input_tokens=100, output_tokens=8, prefix_group="a", prefix_tokens=64),
        _line(arrival_s=0.5, input_tokens=90, output_tokens=4, prefix_group="a", prefix_tokens=64),
        _line(arrival_s=2.0, input_tokens=100, output_tokens=8, prefix_group="b", prefix_tokens=64),
    ]
    first, second, third = sorted(parse_lines(lines, block_size=16), key=lambda r: r.request_id)
    assert [r.arrival_s for r in parse_lines(lines)] == [0.5, 1.0, 2.0]  # by arrival
    assert len(first.block_hashes) == 100 // 16 and len(second.block_hashes) == 90 // 16
    assert first.block_hashes[:4] == second.block_hashes[:4]  # 64 shared tokens = 4 blocks
    assert first.block_hashes[4] != second.block_hashes[4]
    assert first.block_hashes[0] != third.block_hashes[0]  # another group
    assert (first.prompt_tokens, first.output_tokens) == (100, 8)


def test_jsonl_explicit_hashes_and_no_group() -> None:
    rows = parse_lines(
        [
            _line(arrival_s=0, input_tokens=40, output_tokens=2, block_hashes=[7, 8]),
            _line(arrival_s=0, input_tokens=40, output_tokens=2),
            _line(arrival_s=0, input_tokens=40, output_tokens=2),
        ]
    )
    assert rows[0].block_hashes == (7, 8)
    assert rows[1].block_hashes[0] != rows[2].block_hashes[0]  # unique prompts


def test_mooncake_ids_map_onto_our_blocks(tmp_path) -> None:
    path = tmp_path / "mooncake.jsonl"
    path.write_text(
        "\n".join(
            [
                _line(timestamp=1500, input_length=1100, output_length=10, hash_ids=[1, 2, 3]),
                _line(timestamp=0, input_length=600, output_length=5, hash_ids=[1, 9]),
            ]
        )
    )
    late, early = sorted(load_trace(path), key=lambda r: -r.arrival_s)
    assert (late.arrival_s, early.arrival_s) == (1.5, 0.0)  # ms → s
    assert len(late.block_hashes) == 1100 // 16 and len(early.block_hashes) == 600 // 16
    # shared first Mooncake block (512 tokens) = 32 of our blocks, then they differ
    assert late.block_hashes[:32] == early.block_hashes[:32]
    assert late.block_hashes[32] != early.block_hashes[32]
    assert mooncake_chain([1], 512, 64) == mooncake_chain([1, 5], 512, 64)  # 8 blocks each


@pytest.mark.parametrize(
    "line, message",
    [
        ("[1, 2]", "JSON object"),
        (_line(arrival_s=0, input_tokens=0, output_tokens=1), "input_tokens"),
        (_line(arrival_s=0, input_tokens=5, output_tokens="x"), "output_tokens"),
        (_line(timestamp=0, input_length=5, output_length=1, hash_ids=3), "hash_ids"),
        (_line(arrival_s=0, input_tokens=20, output_tokens=1, block_hashes=[1, 2]), "block_hashes"),
        ("{not json", "trace:1"),
        (_line(input_tokens=5, output_tokens=1), "arrival_s"),
    ],
)
def test_bad_lines_name_the_line(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_lines([line])


def test_sim_request_validates() -> None:
    with pytest.raises(ValueError, match="arrival_s"):
        SimRequest("r", -1.0, 5, 5)
    with pytest.raises(ValueError, match="non-empty"):
        SimRequest("", 0.0, 5, 5)
