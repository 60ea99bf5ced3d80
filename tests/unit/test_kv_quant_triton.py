"""The quantized paged decode kernel (engine/triton_kv_quant.py) against torch references.

Without CUDA the kernel runs in triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` before triton is imported; see tests/unit/test_triton_ops.py). Sizes
are tiny: the interpreter runs each program in Python.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
import triton
import triton.language as tl

from engine import kv_quant
from engine.kv_cache import KVCache, KVLayout
from engine.triton_kv_quant import _dequant

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
BLOCK_SIZE = 4
KINDS = [kv_quant.FP8, kv_quant.INT8]


@pytest.fixture(scope="module")
def ops() -> ModuleType:
    from engine import triton_kv_quant

    if not HAS_CUDA and type(_dequant).__name__ != "InterpretedFunction":
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (see conftest)")
    return triton_kv_quant


@triton.jit
def _decode_codes_kernel(codes_ptr, out_ptr, N: tl.constexpr, FP8: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, _dequant(tl.load(codes_ptr + i), FP8))


def test_fp8_codes_decode_exactly(ops: ModuleType) -> None:
    """Every finite e4m3fn code (normals, subnormals, ±0) decodes to torch's value."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    finite = (codes & 0x7F) != 0x7F  # 0x7F / 0xFF are NaN, never written
    out = torch.empty(256, dtype=torch.float32, device=DEVICE)
    _decode_codes_kernel[(1,)](codes.to(DEVICE), out, N=256, FP8=True)
    want = codes.view(torch.float8_e4m3fn).to(torch.float32)
    assert torch.equal(out.cpu()[finite], want[finite])


def _case(kind: str, lens: list[int], heads: int, kv_heads: int, dim: int, num_blocks: int = 12):
    gen = torch.Generator().manual_seed(len(lens) * 7 + dim)
    q = torch.randn(len(lens), heads, dim, generator=gen)
    shape = (num_blocks, BLOCK_SIZE, kv_heads, dim)
    k = kv_quant.quantize(torch.randn(shape, generator=gen) * 3, kind)
    v = kv_quant.quantize(torch.randn(shape, generator=gen), kind)
    width = max(-(-n // BLOCK_SIZE) for n in lens) + 1
    tables = torch.zeros(len(lens), width, dtype=torch.int32)  # padding → block 0, unread
    for b, n in enumerate(lens):
        used = -(-n // BLOCK_SIZE)
        tables[b, :used] = torch.randperm(num_blocks, generator=gen)[:used].int()
    lens_t = torch.tensor(lens, dtype=torch.int32)
    return tuple(x.to(DEVICE) for x in (q, k, v, tables, lens_t))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(6, 2, 16), (3, 3, 8)])
def test_quantized_decode_matches_the_torch_reference(
    ops: ModuleType, kind: str, heads: int, kv_heads: int, dim: int
) -> None:
    lens = [1, 3, 4, 9, 14]  # one token, partial block, one block, partial tail, several
    args = _case(kind, lens, heads, kv_heads, dim)
    scale = dim**-0.5
    out = ops.paged_decode_attention(*args, scale)
    ref = ops.reference_paged_decode_attention(*args, scale)
    assert out.shape == (len(lens), heads, dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # The engine's own torch path (engine/attention.py) agrees too.
    from engine.attention import DecodeBatch, _decode

    q, k, v, tables, lens_t = args
    mask = torch.arange(tables.shape[1] * BLOCK_SIZE)[None, :] < lens_t.cpu()[:, None]
    batch = DecodeBatch(0, len(lens), tables.cpu().long(), lens_t.cpu(), mask[:, None, None])
    torch_path = _decode(q.cpu(), k.cpu(), v.cpu(), batch, scale)
    torch.testing.assert_close(out.cpu(), torch_path, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_decode_on_a_page_first_layer_in_bf16(ops: ModuleType, kind: str) -> None:
    """One layer of a page-first cache (strided over blocks), bf16 queries and output."""
    layout = KVLayout(3, 2, 16, BLOCK_SIZE, 8, kind, "page_first")
    cache = KVCache(layout, DEVICE)
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(*cache.tensor.shape[:-1], 16, generator=gen)
    cache.tensor.copy_(kv_quant.quantize(values, kind).to(DEVICE))
    k, v = cache.layer(1)
    assert not k.is_contiguous()
    q = torch.randn(2, 4, 16, generator=gen).to(DEVICE, torch.bfloat16)
    tables = torch.tensor([[3, 5, 0], [7, 1, 2]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([6, 11], dtype=torch.int32, device=DEVICE)
    out = ops.paged_decode_attention(q, k, v, tables, lens, 0.25)
    ref = ops.reference_paged_decode_attention(q, k, v, tables, lens, 0.25)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_quantized_decode_refuses_plain_caches(ops: ModuleType) -> None:
    q, k, v, tables, lens = _case(kv_quant.INT8, [2], 2, 1, 8)
    with pytest.raises(ValueError, match="quantized K/V"):
        ops.paged_decode_attention(q, k.float(), v.float(), tables, lens, 0.3)
