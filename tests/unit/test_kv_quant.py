"""KV cache quantization (engine/kv_quant.py): row format, error bounds, attention over a
quantized paged cache, the engine option and its validation.

Error bounds, per element of a row with absmax ``a`` and scale ``s = a / QMAX``:
- int8 (QMAX 127, round to nearest): ``|x - x'| <= s / 2 = a / 254``;
- fp8 e4m3 (QMAX 448, 3 mantissa bits): ``|x - x'| <= |x| * 2**-4`` for normal codes, and
  ``<= s * 2**-10`` (half the subnormal step ``2**-9``) below them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import kv_quant
from engine.attention import AttentionMetadata, DecodeBatch, PrefillSpan, paged_attention
from engine.config import EngineConfig
from engine.kv_cache import KVCache, KVLayout, torch_dtype

KINDS = [kv_quant.FP8, kv_quant.INT8]


def _rows(seed: int, shape: tuple[int, ...] = (200, 3, 64), spread: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Rows of very different magnitudes, as keys after RoPE have: the scale is per row.
    magnitude = torch.exp(torch.randn(*shape[:-1], 1, generator=gen) * spread)
    return torch.randn(shape, generator=gen) * magnitude


def _bound(x: torch.Tensor, kind: str) -> torch.Tensor:
    amax = x.abs().amax(-1, keepdim=True)
    if kind == kv_quant.INT8:
        return amax / 254 * (1 + 1e-5)
    scale = amax / 448
    return torch.maximum(x.abs() * 2**-4, scale * 2**-10) * (1 + 1e-5)


# ---- the row format ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_error_is_within_the_format_bound(kind: str) -> None:
    x = _rows(0)
    stored = kv_quant.quantize(x, kind)
    assert stored.shape == (200, 3, 68)
    assert stored.dtype == kv_quant.storage_dtype(kind)
    assert kv_quant.kind_of(stored) == kind
    back = kv_quant.dequantize(stored, torch.float32)
    assert back.shape == x.shape
    assert bool(((back - x).abs() <= _bound(x, kind)).all())
    # The scale travels inside the row: bytes 64..67 are the float32 amax / QMAX.
    scale = stored[..., 64:].contiguous().view(torch.float32)
    qmax = 448.0 if kind == kv_quant.FP8 else 127.0
    torch.testing.assert_close(scale, x.abs().amax(-1, keepdim=True) / qmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_the_plain_formula(dtype: torch.dtype) -> None:
    """The CPU fp8 table lookup and the one-pass int8 multiply give exactly
    ``(float(code) * scale).to(dtype)``, torch's own float8 cast included."""
    x = _rows(5)
    for kind in KINDS:
        stored = kv_quant.quantize(x, kind)
        codes = stored[..., :64]
        if kind == kv_quant.FP8:
            codes = codes.view(torch.float8_e4m3fn)
        scale = stored[..., 64:].contiguous().view(torch.float32)
        want = (codes.to(torch.float32) * scale).to(dtype)
        assert torch.equal(kv_quant.dequantize(stored, dtype), want)


def test_int8_is_the_more_accurate_format_on_gaussian_rows() -> None:
    """Symmetric absmax/127 int8 keeps ~7 bits over the whole row; fp8 e4m3 keeps 3
    mantissa bits per value, so int8's relative error is several times smaller."""
    x = _rows(1, spread=0.0)
    err = {
        kind: float((kv_quant.dequantize(kv_quant.quantize(x, kind), torch.float32) - x).norm())
        / float(x.norm())
        for kind in KINDS
    }
    assert err[kv_quant.INT8] < 0.01
    assert err[kv_quant.FP8] < 0.04
    assert err[kv_quant.INT8] * 2 < err[kv_quant.FP8]


@pytest.mark.parametrize("kind", KINDS)
def test_zero_rows_stay_zero_with_a_positive_scale(kind: str) -> None:
    x = torch.zeros(4, 2, 64)
    x[1, 0] = _rows(2, (64,))  # one non-zero row between zero rows
    stored = kv_quant.quantize(x, kind)
    scale = stored[..., 64:].contiguous().view(torch.float32)
    assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())
    back = kv_quant.dequantize(stored, torch.float32)
    assert bool(torch.isfinite(back).all())
    assert not back[0].any() and not back[2:].any()
    assert bool(((back[1, 0] - x[1, 0]).abs() <= _bound(x[1, 0], kind)).all())


@pytest.mark.parametrize("kind", KINDS)
def test_large_and_tiny_values_keep_their_relative_precision(kind: str) -> None:
    """The scale absorbs the magnitude: 1e30 and 1e-30 rows round-trip like unit rows."""
    base = _rows(3, (2, 64), spread=0.0)
    for factor in (1e30, 1e-30, 65504.0):
        x = base * factor
        back = kv_quant.dequantize(kv_quant.quantize(x, kind), torch.float32)
        assert bool(torch.isfinite(back).all())
        assert bool(((back - x).abs() <= _bound(x, kind)).all())
    # The largest element of a row is exact in both formats (it maps to +-QMAX).
    x = base.clone()
    back = kv_quant.dequantize(kv_quant.quantize(x, kind), torch.float32)
    i = x.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(back.gather(-1, i), x.gather(-1, i), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_rows_round_trip_to_bf16(kind: str) -> None:
    x = _rows(4, (8, 3, 64)).to(torch.bfloat16)
    back = kv_quant.dequantize(kv_quant.quantize(x, kind), torch.bfloat16)
    assert back.dtype == torch.bfloat16
    # bf16 output rounding (2**-9 relative) on top of the format's bound.
    bound = _bound(x.float(), kind) + x.float().abs() * 2**-8
    assert bool(((back.float() - x.float()).abs() <= bound).all())


def test_layout_rows_carry_the_scale_and_halve_bf16_bytes() -> None:
    """SmolLM2 (30 layers, 3 KV heads, head_dim 64): a row is 64 codes + 4 scale bytes."""
    bf16 = KVLayout(30, 3, 64, 16, 8, "bfloat16")
    for name in KINDS:
        layout = KVLayout(30, 3, 64, 16, 8, name)
        assert layout.block_shape == (16, 3, 68)
        assert layout.bytes_per_token == 2 * 30 * 3 * 68
        assert layout.bytes_per_token / bf16.bytes_per_token == pytest.approx(68 / 128)
        cache = KVCache(layout)
        assert cache.storage.dtype == torch_dtype(name)
        assert cache.storage.numel() * cache.storage.element_size() == layout.total_bytes
        assert kv_quant.head_dim_of(cache.tensor) == 64
    with pytest.raises(ValueError, match="divisible by 4"):
        KVLayout(2, 1, 6, 16, 4, kv_quant.INT8).block_shape  # noqa: B018
    assert kv_quant.layout_dtype("auto", "bfloat16") == "bfloat16"
    assert kv_quant.layout_dtype("fp8", "float32") == kv_quant.FP8
    with pytest.raises(ValueError, match="not a quantized"):
        kv_quant.dequantize(torch.zeros(2, 68), torch.float32)


# ---- attention over a quantized paged cache -------------------------------------------------

BLOCK = 4
HEADS, KV_HEADS, DIM = 6, 2, 16


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
    """fp32 reference: queries at positions offset.. over keys 0..len(k), causal, GQA."""
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, 1).transpose(0, 1)
    vv = v.repeat_interleave(group, 1).transpose(0, 1)
    pos = torch.arange(q.shape[0])[:, None] + offset
    mask = torch.arange(k.shape[0])[None, :] <= pos
    out = F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask, scale=DIM**-0.5)
    return out.transpose(0, 1)


def _table(blocks: list[int]) -> torch.Tensor:
    return torch.tensor(blocks, dtype=torch.int64)


def _decode_batch(tables: list[list[int]], lens: list[int]) -> DecodeBatch:
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
    mask = torch.arange(width * BLOCK)[None, :] < torch.tensor(lens)[:, None]
    return DecodeBatch(
        0, len(lens), padded, torch.tensor(lens, dtype=torch.int32), mask[:, None, None]
    )


def _slots(table: list[int], start: int, stop: int) -> list[int]:
    return [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, stop)]


@pytest.mark.parametrize(("kind", "tol"), [(kv_quant.FP8, 0.08), (kv_quant.INT8, 0.015)])
@pytest.mark.parametrize("order", ["layer_first", "page_first"])
def test_paged_attention_reads_the_quantized_cache(kind: str, tol: float, order: str) -> None:
    """Chunked prefill (second chunk reads the first chunk's quantized K/V) and decode,
    through paged_attention, against (a) dense fp32 attention over the *dequantized* K/V —
    the paging and dequantization path, tight — and (b) over the original K/V — the
    format's accuracy, within ``tol`` of the output's magnitude."""
    gen = torch.Generator().manual_seed(7)
    n = 11  # tokens: chunk 1 = 6, chunk 2 = 4, then one decode
    q = torch.randn(n, HEADS, DIM, generator=gen)
    k = torch.randn(n, KV_HEADS, DIM, generator=gen) * 2
    v = torch.randn(n, KV_HEADS, DIM, generator=gen)
    layout = KVLayout(2, KV_HEADS, DIM, BLOCK, 8, kind, order)
    cache = KVCache(layout)
    k_cache, v_cache = cache.layer(1)
    table = [5, 2, 7]  # non-contiguous blocks, 3 x 4 slots for 11 tokens
    stride = layout.row_stride
    slot = [table[p // BLOCK] * stride + p % BLOCK for p in range(n)]
    outs = []
    for start, stop, prefix in [(0, 6, False), (6, 10, True)]:
        span = PrefillSpan(
            0, stop - start, stop, _table(table[: -(-stop // BLOCK)]) if prefix else None
        )
        meta = AttentionMetadata(torch.tensor(slot[start:stop]), [], [span])
        outs.append(
            paged_attention(
                q[start:stop], k[start:stop], v[start:stop], k_cache, v_cache, meta, DIM**-0.5
            )
        )
    meta = AttentionMetadata(torch.tensor(slot[10:]), [_decode_batch([table], [n])], [])
    outs.append(paged_attention(q[10:], k[10:], v[10:], k_cache, v_cache, meta, DIM**-0.5))

    kq = kv_quant.dequantize(kv_quant.quantize(k, kind), torch.float32)
    vq = kv_quant.dequantize(kv_quant.quantize(v, kind), torch.float32)
    # Chunk 1 had no prefix: fresh, unquantized K/V. Chunk 2 and the decode read the cache.
    torch.testing.assert_close(outs[0], _dense(q[:6], k[:6], v[:6], 0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1], _dense(q[6:10], kq[:10], vq[:10], 6), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[2], _dense(q[10:], kq, vq, 10), atol=1e-5, rtol=1e-5)
    for got, ref in [
        (outs[1], _dense(q[6:10], k[:10], v[:10], 6)),
        (outs[2], _dense(q[10:], k, v, 10)),
    ]:
        assert float((got - ref).abs().max()) <= tol * float(ref.abs().max())
    # Other layers and unused blocks are untouched.
    assert not cache.tensor[0].any()
    assert not cache.tensor[1, :, [0, 1, 3, 4, 6]].any()


def test_decode_groups_with_different_lengths_read_their_own_rows() -> None:
    gen = torch.Generator().manual_seed(8)
    layout = KVLayout(1, KV_HEADS, DIM, BLOCK, 10, kv_quant.INT8)
    k_cache, v_cache = KVCache(layout).layer(0)
    tables, lens = [[3, 8], [1, 4, 9]], [7, 10]
    ks = [torch.randn(n, KV_HEADS, DIM, generator=gen) for n in lens]
    vs = [torch.randn(n, KV_HEADS, DIM, generator=gen) for n in lens]
    for t, kk, vv, n in zip(tables, ks, vs, lens, strict=True):  # history, written as a prefill
        meta = AttentionMetadata(
            torch.tensor(_slots(t, 0, n - 1)), [], [PrefillSpan(0, n - 1, n - 1, None)]
        )
        qq = torch.randn(n - 1, HEADS, DIM, generator=gen)
        paged_attention(qq, kk[: n - 1], vv[: n - 1], k_cache, v_cache, meta, DIM**-0.5)
    q = torch.randn(2, HEADS, DIM, generator=gen)
    slots = torch.tensor([_slots(t, n - 1, n)[0] for t, n in zip(tables, lens, strict=True)])
    meta = AttentionMetadata(slots, [_decode_batch(tables, lens)], [])
    new_k = torch.stack([kk[-1] for kk in ks])
    new_v = torch.stack([vv[-1] for vv in vs])
    out = paged_attention(q, new_k, new_v, k_cache, v_cache, meta, DIM**-0.5)
    for row in range(2):
        kq = kv_quant.dequantize(kv_quant.quantize(ks[row], kv_quant.INT8), torch.float32)
        vq = kv_quant.dequantize(kv_quant.quantize(vs[row], kv_quant.INT8), torch.float32)
        ref = _dense(q[row : row + 1], kq, vq, lens[row] - 1)
        torch.testing.assert_close(out[row : row + 1], ref, atol=1e-5, rtol=1e-5)


# ---- validation ------------------------------------------------------------------------------


def test_unknown_kv_cache_dtype_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"kv_cache_dtype must be one of \('auto', 'fp8', 'int8'\)"
    ):
        EngineConfig(kv_cache_dtype="fp4")


def test_fp8_where_unsupported_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import LLM

    refusal = r"not supported on device meta.*use kv_cache_dtype='int8'"
    with pytest.raises(ValueError, match=refusal):
        LLM(kv_cache_dtype="fp8", device="meta")
    kv_quant.check_supported("int8", "meta")  # int8 needs nothing special
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match=r"needs torch\.float8_e4m3fn"):
        kv_quant.check_supported("fp8", "cpu")


def test_worker_flag_reaches_the_engine_config() -> None:
    from common.worker_info import WorkerRole
    from worker.config import build_parser, parse_config

    parser = build_parser("t", "t")
    config = parse_config(parser, ["--kv-cache-dtype", "int8"], WorkerRole.DECODE)
    assert config.engine.kv_cache_dtype == "int8"
    with pytest.raises(SystemExit):
        parse_config(build_parser("t", "t"), ["--kv-cache-dtype", "e5m2"], WorkerRole.DECODE)
