"""Run coalescing and the frame plan: segments, direct pieces, staged blocks, posting rule."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.block_manager import BlockManager
from engine.kv_cache import ORDERS, KVCache, KVLayout
from kv_transfer.errors import ProtocolError
from kv_transfer.packing import (
    Staging,
    layer_block_bytes,
    pack_staged,
    piece_bytes,
    piece_view,
    piece_views,
    staged_ids,
    unpack_staged,
)
from kv_transfer.segments import (
    DIRECT_FRAME_FACTOR,
    PAGES,
    direct_blocks,
    long_runs,
    overlaps,
    plan_frames,
    post_limit,
    run_min_blocks,
)
from kv_transfer.types import TransferMode
from kv_transfer.wire import CTRL_BYTES, CTRL_RUNS, read_runs, write_runs

LAYOUT = KVLayout(num_layers=5, num_kv_heads=2, head_dim=8, block_size=4, num_blocks=64)
LBB = layer_block_bytes(LAYOUT)  # 512: K + V of one block in one layer; a piece block is 256


@st.composite
def id_pair(draw: st.DrawFn, max_blocks: int = 40) -> tuple[list[int], list[int]]:
    """Source and destination ids of one transfer: runs of various lengths, any order."""
    n = draw(st.integers(1, max_blocks))

    def side() -> list[int]:
        if draw(st.booleans()):  # a permutation: fully scattered
            return draw(st.permutations(range(64)))[:n]
        manager = BlockManager(64, 4)  # the real allocator after some churn
        held = [manager.allocate_blocks(draw(st.integers(1, 12))) for _ in range(4)]
        for i in draw(st.lists(st.integers(0, 3), max_size=4, unique=True)):
            manager.free_blocks(held[i])
        return manager.allocate_blocks(n) if manager.num_free_blocks >= n else list(range(n))

    return side(), side()


def _all_runs(ids: list[int]) -> list[tuple[int, int]]:
    return list(long_runs(ids, 1, len(ids)))


@given(st.lists(st.integers(0, 30), min_size=1, max_size=30, unique=True))
def test_runs_are_the_maximal_stretches_of_consecutive_ids(ids: list[int]) -> None:
    runs = _all_runs(ids)
    assert runs[0][0] == 0 and runs[-1][1] == len(ids)
    for (_, b), (c, _) in itertools.pairwise(runs):
        assert b == c and ids[c] != ids[c - 1] + 1  # maximal: a real break between them
    for a, b in runs:
        assert ids[a:b] == list(range(ids[a], ids[a] + b - a))


@given(
    st.lists(st.integers(0, 60), min_size=1, max_size=40, unique=True),
    st.integers(1, 8),
    st.integers(0, 6),
)
def test_long_runs_keep_the_longest_in_order(ids: list[int], min_blocks: int, limit: int) -> None:
    every = [r for r in _all_runs(ids) if r[1] - r[0] >= min_blocks]
    kept = long_runs(ids, min_blocks, limit)
    assert list(kept) == sorted(kept) and set(kept) <= set(every)
    assert len(kept) == min(limit, len(every))
    if kept and len(every) > limit:  # nothing left out is longer than what was kept
        shortest = min(b - a for a, b in kept)
        assert all(b - a <= shortest for a, b in set(every) - set(kept))


def test_run_examples() -> None:
    assert long_runs([5], 1, 9) == ((0, 1),)
    assert long_runs([3, 4, 9, 10, 2], 1, 9) == ((0, 2), (2, 4), (4, 5))
    assert long_runs([3, 4, 9, 10, 11, 2], 2, 9) == ((0, 2), (2, 5))
    assert long_runs([3, 4, 9, 10, 11, 2], 2, 1) == ((2, 5),)
    assert long_runs([6, 5, 4], 1, 9) == ((0, 1), (1, 2), (2, 3))  # descending: runs of one
    assert direct_blocks(0, LBB) == 1 and direct_blocks(256, LBB) == 1
    assert direct_blocks(257, LBB) == 2 and direct_blocks(3 * 256, LBB) == 3


@given(id_pair())
def test_overlaps_are_contiguous_on_both_sides(ids: tuple[list[int], list[int]]) -> None:
    src, dst = ids
    n = min(len(src), len(dst))
    src, dst = src[:n], dst[:n]
    segments = overlaps(_all_runs(src), _all_runs(dst))
    assert segments[0][0] == 0 and segments[-1][1] == n  # every position is in one
    assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(segments))
    for a, b in segments:
        assert src[a:b] == list(range(src[a], src[a] + b - a))
        assert dst[a:b] == list(range(dst[a], dst[a] + b - a))


@settings(max_examples=80)
@example(  # page-first, two runs left out: their staged blocks fall into one frame
    ([4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [0, 1, 2, 3, 4, 5, 7, 6, 8, 10]),
    TransferMode.WHOLE,
    5 * LBB,
    0,
    True,
)
@given(
    id_pair(),
    st.sampled_from(list(TransferMode)),
    st.sampled_from([LBB, 3 * LBB, 5 * LBB, 8 * LBB, 10**9]),
    st.sampled_from([0, 256, 3 * 256, 6 * LBB, 10**9]),
    st.booleans(),
)
def test_plan_moves_every_layer_block_once_and_respects_the_limits(
    ids: tuple[list[int], list[int]],
    mode: TransferMode,
    chunk_bytes: int,
    direct_min: int,
    page_first: bool,
) -> None:
    src, dst = ids
    n = min(len(src), len(dst))
    layers = LAYOUT.num_layers
    min_blocks = run_min_blocks(direct_min, LBB, layers, mode, page_first)
    limit = 3  # a small limit: some runs left out
    runs = long_runs(src[:n], min_blocks, limit), long_runs(dst[:n], min_blocks, limit)
    plan = plan_frames(n, layers, LBB, mode, chunk_bytes, direct_min, *runs, page_first=page_first)
    segments = overlaps(_all_runs(src[:n]), _all_runs(dst[:n]))
    layout = dataclasses.replace(LAYOUT, order="page_first" if page_first else "layer_first")
    moved: list[tuple[int, int, int]] = []  # (layer, kv, position)
    for frame in plan:
        chunk = frame.chunk
        chunk_layers = range(chunk.layer_start, chunk.layer_stop)
        moved += [(la, kv, p) for la in chunk_layers for kv in (0, 1) for p in frame.staged]
        assert frame.pages == (page_first and mode is TransferMode.WHOLE)
        if frame.pages:  # a whole-pages frame spans every layer
            assert (chunk.layer_start, chunk.layer_stop) == (0, layers)
        if page_first and mode is TransferMode.LAYERWISE:
            assert not frame.pieces()  # one layer of a page-first run is strided
        for layer, kv, start, stop in frame.pieces():
            assert piece_bytes(layout, (layer, kv, start, stop)) >= direct_min
            assert any(a <= start and stop <= b for a, b in segments)  # contiguous both sides
            if layer == PAGES:
                moved += [
                    (la, k, p) for la in chunk_layers for k in (0, 1) for p in range(start, stop)
                ]
            else:
                moved += [(layer, kv, p) for p in range(start, stop)]
        assert set(frame.staged) | {p for a, b in frame.direct for p in range(a, b)} == set(
            range(chunk.block_start, chunk.block_stop)
        )
        direct_bytes = sum(piece_bytes(layout, piece) for piece in frame.pieces())
        assert frame.staged_bytes(LBB) + direct_bytes == frame.nbytes(LBB)
        # staging memory stays within chunk_bytes; direct pieces may make a frame bigger
        unit = LBB * (layers if frame.pages else 1)  # the smallest frame: one block's worth
        assert frame.staged_bytes(LBB) <= max(chunk_bytes, unit)
        assert frame.nbytes(LBB) <= DIRECT_FRAME_FACTOR * max(chunk_bytes, unit)
        if mode is TransferMode.LAYERWISE:
            assert frame.num_layers == 1
    expected = [(la, kv, p) for la in range(layers) for kv in (0, 1) for p in range(n)]
    assert sorted(moved) == expected


def test_page_first_whole_transfers_send_a_segment_as_one_piece() -> None:
    # segments of 6, 1, 3 blocks: in a page-first cache each is one whole-pages piece
    src = list(range(10, 20))
    dst = [40, 41, 42, 43, 44, 45, 7, 0, 1, 2]
    mb = run_min_blocks(128, LBB, 2, TransferMode.WHOLE, page_first=True)
    assert mb == 1  # a block's pages (2 layers, K and V) are 1 KiB
    runs = long_runs(src, mb, 9), long_runs(dst, mb, 9)
    (frame,) = plan_frames(10, 2, LBB, TransferMode.WHOLE, 10**9, 128, *runs, page_first=True)
    assert frame.pages and frame.staged == ()
    assert frame.pieces() == [(PAGES, PAGES, 0, 6), (PAGES, PAGES, 6, 7), (PAGES, PAGES, 7, 10)]
    layerwise = plan_frames(10, 2, LBB, TransferMode.LAYERWISE, 10**9, 128, *runs, page_first=True)
    assert len(layerwise) == 2 and all(f.staged == tuple(range(10)) for f in layerwise)


def test_direct_threshold_splits_a_mixed_transfer() -> None:
    # source: one run; destination: runs of 6, 1, 3 blocks -> segments of 6, 1, 3
    src = list(range(10, 20))
    dst = [40, 41, 42, 43, 44, 45, 7, 0, 1, 2]
    runs = long_runs(src, 3, 9), long_runs(dst, 3, 9)
    assert runs == (((0, 10),), ((0, 6), (7, 10)))
    (frame,) = plan_frames(10, 2, LBB, TransferMode.WHOLE, 10**9, 3 * LBB // 2, *runs)
    assert frame.direct == ((0, 6), (7, 10)) and frame.staged == (6,)
    assert frame.pieces()[:3] == [(0, 0, 0, 6), (0, 1, 0, 6), (1, 0, 0, 6)]
    assert len(frame.pieces()) == 2 * 2 * 2


def test_direct_only_transfers_skip_the_ramp() -> None:
    args = (60, 30, LBB, TransferMode.WHOLE, 8 * 60 * LBB)
    staged = plan_frames(*args, 10**9, (), ())
    direct = plan_frames(*args, 0, ((0, 60),), ((0, 60),))
    # nothing staged: frames of DIRECT_FRAME_FACTOR x 8 layers, no ramp
    assert len(direct) == -(-30 // (8 * DIRECT_FRAME_FACTOR))
    assert all(f.direct and not f.staged for f in direct)
    assert len(staged) == 4 + 6  # ramped: the end frames are cut in four
    assert all(f.staged and not f.direct for f in staged)


def test_post_limit_keeps_depth_frames_posted_pieces_or_not() -> None:
    staged = plan_frames(4, 4, LBB, TransferMode.LAYERWISE, LBB * 4, 10**9, (), ())
    direct = plan_frames(4, 4, LBB, TransferMode.LAYERWISE, LBB * 4, 0, ((0, 4),), ((0, 4),))
    for plan in (staged, direct):
        assert [post_limit(plan, landed, 3) for landed in range(5)] == [3, 4, 4, 4, 4]
        assert post_limit(plan, 0, 2) == 2


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", list(TransferMode))
@pytest.mark.parametrize("direct_min", [0, 3 * 256, 10**9])
def test_staged_and_direct_pieces_land_bit_exact_in_other_block_ids(
    direct_min: int, mode: TransferMode, order: str
) -> None:
    torch.manual_seed(0)
    layout = dataclasses.replace(LAYOUT, order=order)
    src, dst = KVCache(layout), KVCache(layout)
    src.tensor.normal_()
    dst.tensor.fill_(-7.0)
    src_ids = (3, 4, 5, 6, 7, 30, 31, 9, 50, 51, 52)
    dst_ids = (20, 21, 22, 60, 61, 62, 63, 1, 2, 40, 41)
    mb = run_min_blocks(direct_min, LBB, layout.num_layers, mode, layout.page_first)
    runs = long_runs(src_ids, mb, 9), long_runs(dst_ids, mb, 9)
    plan = plan_frames(
        11, layout.num_layers, LBB, mode, 4 * LBB, direct_min, *runs,
        page_first=layout.page_first,
    )  # fmt: skip
    staging = Staging(torch.device("cpu"))
    for frame in plan:
        buf = staging.frame(0, frame.staged_bytes(LBB))
        if frame.staged:
            pack_staged(src, staged_ids(src_ids, frame, src.device), frame, buf)
            unpack_staged(dst, staged_ids(dst_ids, frame, dst.device), frame, buf)
        outs, intos = piece_views(src, src_ids, frame), piece_views(dst, dst_ids, frame)
        assert len(outs) == len(intos) == len(frame.pieces())
        for piece, out, into in zip(frame.pieces(), outs, intos, strict=True):
            assert out.is_contiguous() and into.is_contiguous()
            assert out.numel() * out.element_size() == piece_bytes(layout, piece)
            assert torch.equal(out, piece_view(src, src_ids, piece))
            into.copy_(out)  # what the wire does
    assert torch.equal(src.gather(torch.tensor(src_ids)), dst.gather(torch.tensor(dst_ids)))
    untouched = [b for b in range(layout.num_blocks) if b not in dst_ids]
    assert bool((dst.gather(torch.tensor(untouched)) == -7.0).all())


def test_runs_travel_inline_in_a_control_frame_and_are_checked() -> None:
    frame = torch.zeros(CTRL_BYTES, dtype=torch.uint8)
    runs = ((0, 3), (5, 9), (9, 12))
    write_runs(frame, runs)
    assert read_runs(frame, 3, 12) == runs
    assert read_runs(frame, 0, 12) == ()
    with pytest.raises(ProtocolError):
        read_runs(frame, 3, 10)  # a run outside the transfer
    write_runs(frame, ((0, 3), (2, 4)))
    with pytest.raises(ProtocolError):
        read_runs(frame, 2, 12)  # overlapping
    write_runs(frame, ((3, 3),))
    with pytest.raises(ProtocolError):
        read_runs(frame, 1, 12)  # empty
    with pytest.raises(ProtocolError):
        read_runs(frame, CTRL_RUNS + 1, 10**6)
    with pytest.raises(ValueError):
        write_runs(frame, [(i, i + 1) for i in range(CTRL_RUNS + 1)])
