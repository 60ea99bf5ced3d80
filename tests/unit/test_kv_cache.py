"""The KV cache's two memory orders: the same logical cache, different storage."""

from __future__ import annotations

import pytest
import torch

from engine.attention import write_kv
from engine.config import EngineConfig
from engine.kv_cache import ORDERS, KVCache, KVLayout, slot_rows

GEOMETRY = {"num_layers": 3, "num_kv_heads": 2, "head_dim": 4, "block_size": 4, "num_blocks": 6}


def _layout(order: str) -> KVLayout:
    return KVLayout(**GEOMETRY, order=order)


def test_page_first_storage_keeps_every_layer_of_a_block_together() -> None:
    cache = KVCache(_layout("page_first"))
    assert cache.storage.shape == (6, 3, 2, 4, 2, 4)
    assert cache.tensor.shape == (3, 2, 6, 4, 2, 4)  # the logical view, as layer-first
    cache.tensor[2, 1, 5, 3] = 9.0  # layer 2, V, block 5, offset 3
    assert bool((cache.storage[5, 2, 1, 3] == 9.0).all())
    assert cache.storage[1:4].is_contiguous()  # three blocks' pages: one slice
    assert int(torch.count_nonzero(cache.storage)) == 2 * 4
    assert KVCache(_layout("layer_first")).storage.shape == (3, 2, 6, 4, 2, 4)


def test_row_stride_is_the_distance_between_blocks_of_one_layer() -> None:
    for order in ORDERS:
        layout = _layout(order)
        k, _ = KVCache(layout).layer(1)
        assert k.stride(0) // k.stride(1) == layout.row_stride
    assert _layout("layer_first").row_stride == 4
    assert _layout("page_first").row_stride == 3 * 2 * 4


@pytest.mark.parametrize("order", ORDERS)
def test_slots_write_and_read_the_same_token_in_either_order(order: str) -> None:
    """``block * row_stride + offset`` through :func:`slot_rows` is K/V of that token."""
    layout = _layout(order)
    cache = KVCache(layout)
    gen = torch.Generator().manual_seed(0)
    tokens = [(5, 0), (0, 3), (2, 1), (5, 3)]  # (block, offset)
    slots = torch.tensor([b * layout.row_stride + o for b, o in tokens])
    for layer in range(layout.num_layers):
        k = torch.randn(len(tokens), 2, 4, generator=gen)
        v = torch.randn(len(tokens), 2, 4, generator=gen)
        k_cache, v_cache = cache.layer(layer)
        write_kv(k_cache, v_cache, k, v, slots)
        for i, (block, offset) in enumerate(tokens):
            assert torch.equal(cache.tensor[layer, 0, block, offset], k[i])
            assert torch.equal(cache.tensor[layer, 1, block, offset], v[i])
        assert torch.equal(slot_rows(k_cache).index_select(0, slots), k)
    written = len(tokens) * layout.num_layers * 2 * 2 * 4
    assert int(torch.count_nonzero(cache.tensor)) == written  # nothing else touched


def test_gather_and_scatter_are_the_same_in_either_order() -> None:
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(3, 2, 6, 4, 2, 4, generator=gen)
    caches = {order: KVCache(_layout(order)) for order in ORDERS}
    ids = torch.tensor([4, 0, 2])
    for cache in caches.values():
        cache.tensor.copy_(values)
        assert torch.equal(cache.gather(ids), values.index_select(2, ids))
        assert torch.equal(cache.gather(ids, layer=1), values[1].index_select(1, ids))
        cache.scatter(torch.tensor([1, 3, 5]), cache.gather(ids))
    first, second = caches.values()
    assert torch.equal(first.tensor, second.tensor)


def test_an_unknown_order_is_refused() -> None:
    with pytest.raises(ValueError, match="order must be one of"):
        KVLayout(**GEOMETRY, order="head_first")
    with pytest.raises(ValueError, match="kv_cache_order must be one of"):
        EngineConfig(kv_cache_order="head_first")
