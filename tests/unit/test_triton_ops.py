"""Triton kernels against torch references.

Without CUDA the kernels run in triton's interpreter on CPU tensors. Triton picks
interpreter or compiler when ``@triton.jit`` decorates a function — its own standard
library when ``triton`` is first imported, our kernels when ``engine.triton_ops`` is — so
``TRITON_INTERPRET=1`` must be in the environment before either import. tests/conftest.py
sets it before any test module is imported; the ``ops`` fixture fails loudly if it did not
take effect. With CUDA the same tests run the compiled kernels on the GPU.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
import triton

from engine import triton_ops
from engine.kv_cache import KVCache, KVLayout

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
BLOCK_SIZE = 16


def _interpreted(fn: object) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


@pytest.fixture(scope="module")
def ops() -> ModuleType:
    # Both triton's own jit'd helpers and our kernels must be interpreted to run on CPU.
    if not HAS_CUDA and not (
        _interpreted(triton.language.zeros) and _interpreted(triton_ops._copy_blocks_kernel)
    ):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (see conftest)")
    return triton_ops


def _cache(lead: tuple[int, ...], num_blocks: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    shape = (*lead, num_blocks, BLOCK_SIZE, 3, 8)
    return torch.randn(shape, generator=gen).to(dtype=dtype, device=DEVICE)


# ------------------------------------------------------------------------- gather / scatter

_LEADS = [(2,), (3, 2)]
_DTYPES = [torch.float32, torch.bfloat16]
_IDS = [7, 2, 9, 0, 5]  # unsorted, non-contiguous, includes the first and last block


@pytest.mark.parametrize("lead", _LEADS)
@pytest.mark.parametrize("dtype", _DTYPES)
def test_gather_matches_index_select(ops: ModuleType, lead: tuple[int, ...], dtype) -> None:
    cache = _cache(lead, 10, dtype)
    ids = torch.tensor(_IDS, device=DEVICE)
    out = ops.gather_blocks(cache, ids)
    expected = cache.index_select(cache.dim() - 4, ids)
    assert out.is_contiguous()
    assert out.dtype == dtype
    assert torch.equal(out, expected)


@pytest.mark.parametrize("lead", _LEADS)
@pytest.mark.parametrize("dtype", _DTYPES)
def test_scatter_matches_index_copy(ops: ModuleType, lead: tuple[int, ...], dtype) -> None:
    cache = _cache(lead, 10, dtype)
    ids = torch.tensor(_IDS, dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(1)
    buffer = torch.randn((*lead, len(_IDS), BLOCK_SIZE, 3, 8), generator=gen)
    buffer = buffer.to(dtype=dtype, device=DEVICE)
    expected = cache.clone()
    expected.index_copy_(cache.dim() - 4, ids.long(), buffer)
    ops.scatter_blocks(cache, ids, buffer)
    assert torch.equal(cache, expected)


def test_gather_then_scatter_moves_blocks_between_caches(ops: ModuleType) -> None:
    src = _cache((3, 2), 10, torch.float32)
    dst = torch.zeros_like(src)
    buffer = ops.gather_blocks(src, torch.tensor([6, 3, 2]))
    ops.scatter_blocks(dst, torch.tensor([1, 4, 8]), buffer)
    for s, d in [(6, 1), (3, 4), (2, 8)]:
        assert torch.equal(dst[:, :, d], src[:, :, s])
    untouched = [b for b in range(10) if b not in (1, 4, 8)]
    assert not dst[:, :, untouched].any()


def test_copy_handles_strided_views(ops: ModuleType) -> None:
    """A layer slice and a non-contiguous buffer/cache: strides are honoured."""
    full = _cache((3, 2), 10, torch.float32)
    layer = full[1]  # (2, blocks, ...) view into the middle of the full cache
    ids = torch.tensor([4, 1])
    assert torch.equal(ops.gather_blocks(layer, ids), layer.index_select(1, ids))

    # Heads and head_dim swapped in memory: a cache whose inner dims are not contiguous.
    odd = _cache((2,), 6, torch.float32).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not odd.is_contiguous()
    buffer = torch.randn(2, 2, BLOCK_SIZE, 3, 8, device=DEVICE).transpose(0, 1)  # non-contig
    buffer = buffer.contiguous().transpose(0, 1)
    expected = odd.clone()
    expected.index_copy_(1, ids, buffer)
    ops.scatter_blocks(odd, ids, buffer)
    assert torch.equal(odd, expected)


def test_copy_edge_cases(ops: ModuleType) -> None:
    cache = _cache((2,), 4, torch.float32)
    empty = ops.gather_blocks(cache, torch.tensor([], dtype=torch.int64))
    assert empty.shape == (2, 0, BLOCK_SIZE, 3, 8)
    ops.scatter_blocks(cache, torch.tensor([], dtype=torch.int64), empty)
    with pytest.raises(ValueError, match="buffer shape"):
        ops.scatter_blocks(cache, torch.tensor([0, 1]), empty)
    with pytest.raises(ValueError, match="cache must be"):
        ops.gather_blocks(cache[0], torch.tensor([0]))


# -------------------------------------------------------------------- paged decode attention


def _attention_case(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    context_lens: list[int],
    dtype: torch.dtype = torch.float32,
    num_blocks: int = 24,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Random q, K/V caches and block tables; each sequence gets a random set of blocks."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(context_lens)
    max_blocks = max(-(-n // BLOCK_SIZE) for n in context_lens) + 1  # +1: padding column
    q = torch.randn(batch, num_heads, head_dim, generator=gen)
    k = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen)
    # Padding entries point at block 0 on purpose: they must never be read.
    tables = torch.zeros(batch, max_blocks, dtype=torch.int32)
    for b, n in enumerate(context_lens):
        used = -(-n // BLOCK_SIZE)
        tables[b, :used] = torch.randperm(num_blocks, generator=gen)[:used].int()
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return tuple(x.to(DEVICE) for x in (q.to(dtype), k.to(dtype), v.to(dtype), tables, lens))


def _sdpa(q, k_cache, v_cache, tables, lens, scale) -> torch.Tensor:
    """Independent check of the reference: dense SDPA with GQA over gathered tokens."""
    outs = []
    group = q.size(1) // k_cache.size(2)
    for b in range(q.size(0)):
        n = int(lens[b])
        slots = [(int(tables[b, p // BLOCK_SIZE]), p % BLOCK_SIZE) for p in range(n)]
        k = torch.stack([k_cache[i, o] for i, o in slots], dim=1).float()  # (kvh, n, d)
        v = torch.stack([v_cache[i, o] for i, o in slots], dim=1).float()
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        qb = q[b].float()[:, None, :]  # (heads, 1, d)
        out = torch.nn.functional.scaled_dot_product_attention(qb, k, v, scale=scale)
        outs.append(out[:, 0].to(q.dtype))
    return torch.stack(outs)


_ATTENTION_CASES = {
    # (num_heads, num_kv_heads, head_dim): SmolLM2's GQA 9/3 at head_dim 64, and plain MHA.
    "gqa3": (9, 3, 64),
    "mha": (4, 4, 32),
}
# 1 token, a partial first block, exactly one block, a partial tail, several full blocks.
_CONTEXT_LENS = [1, 5, 16, 37, 48]


@pytest.mark.parametrize("case", list(_ATTENTION_CASES))
def test_paged_decode_attention_matches_reference(ops: ModuleType, case: str) -> None:
    num_heads, num_kv_heads, head_dim = _ATTENTION_CASES[case]
    args = _attention_case(num_heads, num_kv_heads, head_dim, _CONTEXT_LENS)
    scale = head_dim**-0.5
    out = ops.paged_decode_attention(*args, scale)
    ref = ops.reference_paged_decode_attention(*args, scale)
    assert out.shape == (len(_CONTEXT_LENS), num_heads, head_dim)
    assert out.dtype == torch.float32
    torch.testing.assert_close(ref, _sdpa(*args, scale), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_paged_decode_attention_bf16(ops: ModuleType) -> None:
    """bf16 in and out, fp32 inside: close to the fp32 reference on the same bf16 inputs."""
    args = _attention_case(9, 3, 64, [3, 21], dtype=torch.bfloat16, seed=2)
    out = ops.paged_decode_attention(*args, 0.125)
    ref = ops.reference_paged_decode_attention(*args, 0.125)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)


def test_paged_decode_attention_uses_only_valid_tokens(ops: ModuleType) -> None:
    """NaN in every slot past context_len and in the padding block changes nothing."""
    q, k, v, tables, lens = _attention_case(9, 3, 64, [5, 20], seed=3)
    before = ops.paged_decode_attention(q, k, v, tables, lens, 0.125)
    used_blocks = set()
    for b, n in enumerate(lens.tolist()):
        used = -(-n // BLOCK_SIZE)
        used_blocks.update(tables[b, :used].tolist())
        tail = n - (used - 1) * BLOCK_SIZE
        last = int(tables[b, used - 1])
        k[last, tail:], v[last, tail:] = float("nan"), float("nan")
    spare = min(set(range(k.size(0))) - used_blocks)
    for b, n in enumerate(lens.tolist()):
        tables[b, -(-n // BLOCK_SIZE) :] = spare  # padding now points at a poisoned block
    k[spare], v[spare] = float("nan"), float("nan")
    after = ops.paged_decode_attention(q, k, v, tables, lens, 0.125)
    assert torch.equal(before, after)


def test_paged_decode_attention_strided_inputs(ops: ModuleType) -> None:
    """q as a slice of a wider tensor and K/V as one layer of a full KV cache."""
    num_blocks, heads, kv_heads, dim = 8, 6, 2, 32
    cache = torch.randn(2, 2, num_blocks, BLOCK_SIZE, kv_heads, dim, device=DEVICE)
    k, v = cache[1, 0], cache[1, 1]
    qkv = torch.randn(3, heads * 3, dim, device=DEVICE)
    q = qkv[:, :heads]
    assert not q.is_contiguous()
    tables = torch.tensor([[3, 5, 0], [7, 1, 2], [6, 0, 0]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([20, 40, 1], dtype=torch.int32, device=DEVICE)
    out = ops.paged_decode_attention(q, k, v, tables, lens, dim**-0.5)
    ref = ops.reference_paged_decode_attention(q, k, v, tables, lens, dim**-0.5)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_copy_and_decode_on_a_page_first_cache(ops: ModuleType) -> None:
    """A page-first cache's logical view: strided over blocks, layers and K/V."""
    layout = KVLayout(3, 2, 32, BLOCK_SIZE, 10, order="page_first")
    cache, other = KVCache(layout, DEVICE), KVCache(layout, DEVICE)
    cache.storage.copy_(
        torch.randn(cache.storage.shape, generator=torch.Generator().manual_seed(5))
    )
    ids = torch.tensor(_IDS, device=DEVICE)
    gathered = ops.gather_blocks(cache.tensor, ids)
    assert torch.equal(gathered, cache.tensor.index_select(2, ids))
    ops.scatter_blocks(other.tensor, ids, gathered)
    assert torch.equal(other.tensor.index_select(2, ids), gathered)
    k, v = cache.layer(1)
    assert not k.is_contiguous()
    q = torch.randn(2, 6, 32, device=DEVICE)
    tables = torch.tensor([[3, 5, 0], [7, 1, 2]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([20, 40], dtype=torch.int32, device=DEVICE)
    out = ops.paged_decode_attention(q, k, v, tables, lens, 32**-0.5)
    ref = ops.reference_paged_decode_attention(q, k, v, tables, lens, 32**-0.5)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_paged_decode_attention_zero_length_row_is_zero(ops: ModuleType) -> None:
    q, k, v, tables, lens = _attention_case(4, 2, 32, [0, 7], seed=4)
    out = ops.paged_decode_attention(q, k, v, tables, lens, 0.2)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(
        out, ops.reference_paged_decode_attention(q, k, v, tables, lens, 0.2), atol=1e-4, rtol=0
    )
