"""CPU paged attention (block gathers, decode groups, prefix prefills) against dense
attention over each sequence's own K/V, through the runner's real step layout."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from common.sampling import SamplingParams
from engine.attention import paged_attention
from engine.decode_groups import group_by_context
from engine.kv_cache import KVCache, KVLayout
from engine.model_runner import ModelRunner
from engine.scheduler import ScheduledChunk
from engine.sequence import Sequence

HEADS, KV_HEADS, DIM, BS = 6, 2, 16, 4


def _chunks(contexts: list[tuple[int, int]], num_blocks: int) -> list[ScheduledChunk]:
    """(start, num_tokens) per sequence; block ids shuffled so no table is contiguous."""
    ids = list(range(num_blocks))
    random.Random(0).shuffle(ids)
    chunks = []
    for i, (start, n) in enumerate(contexts):
        seq = Sequence(f"s{i}", [1] * (start + n), SamplingParams(), arrival=i)
        need = -(-(start + n) // BS)
        seq.block_table, ids = ids[:need], ids[need:]
        chunks.append(ScheduledChunk(seq, start, n, samples=True))
    return chunks


@pytest.mark.parametrize("order", ["layer_first", "page_first"])
def test_paged_attention_matches_dense(order: str) -> None:
    torch.manual_seed(0)
    layout = KVLayout(2, KV_HEADS, DIM, BS, 400, "float32", order)
    cache = KVCache(layout)
    k_cache, v_cache = cache.layer(1)
    # Decodes with contexts 3..601 (several groups), a prefill with a 10-token prefix, a fresh one.
    contexts = [(c - 1, 1) for c in (3, 5, 9, 17, 300, 310, 601)] + [(10, 7), (0, 9)]
    chunks = _chunks(contexts, layout.num_blocks)
    runner = ModelRunner(None, cache, None)  # type: ignore[arg-type]  # prepare needs no model
    batch = runner.prepare(chunks)
    assert len(batch.meta.decode) >= 2
    # Every sequence's past K/V, already in the cache; the new rows come with the step.
    past_k = {c.seq.request_id: torch.randn(c.start, KV_HEADS, DIM) for c in chunks}
    past_v = {c.seq.request_id: torch.randn(c.start, KV_HEADS, DIM) for c in chunks}
    for c in chunks:
        for pos in range(c.start):
            block, offset = c.seq.block_table[pos // BS], pos % BS
            k_cache[block, offset], v_cache[block, offset] = (
                past_k[c.seq.request_id][pos],
                past_v[c.seq.request_id][pos],
            )
    rows = batch.input_ids.shape[0]
    q, k, v = (torch.randn(rows, h, DIM) for h in (HEADS, KV_HEADS, KV_HEADS))
    out = paged_attention(q, k, v, k_cache, v_cache, batch.meta, DIM**-0.5)
    ordered = sorted(chunks[:7], key=lambda c: c.start) + chunks[7:]
    row = 0
    for c in ordered:
        n, rid = c.num_tokens, c.seq.request_id
        keys = torch.cat([past_k[rid], k[row : row + n]])
        values = torch.cat([past_v[rid], v[row : row + n]])
        mask = torch.arange(c.start + n)[None, :] <= (torch.arange(n) + c.start)[:, None]
        want = F.scaled_dot_product_attention(
            q[row : row + n].transpose(0, 1),
            keys.transpose(0, 1).repeat_interleave(HEADS // KV_HEADS, 0),
            values.transpose(0, 1).repeat_interleave(HEADS // KV_HEADS, 0),
            attn_mask=mask,
            scale=DIM**-0.5,
        ).transpose(0, 1)
        torch.testing.assert_close(out[row : row + n], want, atol=1e-5, rtol=1e-5)
        row += n


def _cost(lengths: list[int], groups: list[tuple[int, int]], overhead: int) -> int:
    return sum((end - start) * lengths[end - 1] + overhead for start, end in groups)


def test_grouping_covers_rows_and_is_optimal() -> None:
    rng = random.Random(1)
    for _ in range(50):
        lengths = sorted(rng.choice([16, 32, 128, 512]) * rng.randint(1, 3) for _ in range(9))
        groups = group_by_context(lengths, overhead=100)
        assert [g[0] for g in groups[1:]] == [g[1] for g in groups[:-1]]
        assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
        # No split into contiguous ranges is cheaper (brute force over all 2^8 cut sets).
        best = min(
            _cost(lengths, _split(len(lengths), mask), 100)
            for mask in range(2 ** (len(lengths) - 1))
        )
        assert _cost(lengths, groups, 100) == best


def _split(n: int, mask: int) -> list[tuple[int, int]]:
    cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
    return list(itertools.pairwise(cuts))


def test_grouping_policy_extremes() -> None:
    assert group_by_context([]) == []
    assert group_by_context([64] * 32) == [(0, 32)]  # equal lengths: one group
    assert group_by_context([16, 4096], overhead=100) == [(0, 1), (1, 2)]
    assert group_by_context([16, 32], overhead=100) == [(0, 2)]
    with pytest.raises(ValueError, match="sorted"):
        group_by_context([32, 16])
