"""Int8 weight-only quantization: round-trip error bound and kernels vs the reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine import quantization as q


def test_round_trip_error_is_within_half_a_step_per_channel() -> None:
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 3
    w[5] = 0.0  # an all-zero row must not divide by zero
    values, scales = q.quantize_per_channel(w)
    assert values.dtype == torch.int8 and scales.shape == (64,)
    err = (q.dequantize(values, scales, torch.float32) - w).abs()
    assert torch.all(err <= scales[:, None] / 2 + 1e-6)
    assert torch.equal(values[5], torch.zeros(96, dtype=torch.int8))


def test_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="quantization must be one of"):
        q.check_method("int4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, q.PACKED_MAX_ROWS, 17])
@pytest.mark.parametrize("shape", [(48, 64), (130, 72), (960, 576)])
def test_int8_linear_matches_reference(dtype, rows, shape) -> None:
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(shape[1], shape[0], bias=True)
    x = torch.randn(rows, shape[1], generator=gen).to(dtype)
    layer = q.Int8Linear.from_linear(linear.to(dtype))
    out = layer(x)
    ref = q.reference_int8_linear(x.float(), layer.weight_int8, layer.scales, layer.bias.float())
    assert out.dtype == dtype and out.shape == (rows, shape[0])
    packed = q.cpu_kernel(rows, *shape) == q.KERNEL_PACKED
    tol = 1e-4 if dtype == torch.float32 and not packed else 3e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_quantize_model_replaces_linears_not_embeddings() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10))
    q.quantize_model(model, "int8")
    assert isinstance(model[0], nn.Embedding)
    assert all(isinstance(m, q.Int8Linear) for m in model[1:])
    assert q.quantize_model(model, "none") is model


def test_scales_are_bf16_exact_and_never_clip() -> None:
    """Scales round up to bf16 values, so the packed kernel's bf16 copy is the same scale
    and the row's largest weight still fits in ±127."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    values, scales = q.quantize_per_channel(w)
    assert torch.equal(scales.to(torch.bfloat16).float(), scales)
    assert torch.all(scales >= w.abs().amax(dim=1) / q.INT8_MAX)
    assert int(values.abs().max()) <= q.INT8_MAX
    assert torch.all(values.abs().amax(dim=1) >= q.INT8_MAX - 1)  # range still used


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_matmul_matches_reference(dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    values, scales = q.quantize_per_channel(torch.randn(40, 24, generator=gen))
    x, bias = torch.randn(9, 24, generator=gen).to(dtype), torch.randn(40, generator=gen)
    out = q.dequant_matmul(x, values, scales, bias.to(dtype))
    ref = q.reference_int8_linear(x.float(), values, scales, bias.to(dtype).float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_cpu_policy_packs_small_aligned_batches_only() -> None:
    assert q.cpu_kernel(1, 960, 576) == q.KERNEL_PACKED
    assert q.cpu_kernel(q.PACKED_MAX_ROWS, 49152, 576) == q.KERNEL_PACKED
    assert q.cpu_kernel(q.PACKED_MAX_ROWS + 1, 960, 576) == q.KERNEL_DEQUANT
    assert q.cpu_kernel(1, 130, 72) == q.KERNEL_DEQUANT  # unaligned: int8pack_mm crashes


def test_fused_and_tied_weights_are_quantized_as_one_matrix() -> None:
    """A tied lm_head gets its own int8 copy; the embedding it shares stays float."""
    embed = nn.Embedding(16, 8)
    head = nn.Linear(8, 16, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "fused": nn.Linear(8, 24), "head": head})
    q.quantize_model(model, "int8")
    assert model["embed"].weight.dtype == torch.float32
    assert model["head"].weight_int8.shape == (16, 8)
    assert model["fused"].weight_int8.shape == (24, 8) and model["fused"].bias.shape == (24,)
    x = torch.randn(2, 8)
    ref = q.reference_int8_linear(x, *q.quantize_per_channel(embed.weight), None)
    torch.testing.assert_close(model["head"](x), ref, rtol=3e-2, atol=3e-2)


def test_engine_config_validates_quantization() -> None:
    from engine.config import EngineConfig

    assert EngineConfig().quantization == "none"
    with pytest.raises(ValueError, match=r"quantization must be one of \('none', 'int8'\)"):
        EngineConfig(quantization="int4")


def test_worker_flag_sets_the_engine_option() -> None:
    from common.worker_info import WorkerRole
    from worker.config import build_parser, config_from_args

    args = build_parser("test", "test").parse_args(["--quantization", "int8"])
    assert config_from_args(args, WorkerRole.DECODE).engine.quantization == "int8"
    bad = build_parser("test", "test").parse_args(["--quantization", "fp4"])
    with pytest.raises(ValueError, match="quantization must be one of"):
        config_from_args(bad, WorkerRole.DECODE)
