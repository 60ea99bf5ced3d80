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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 17])
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
    tol = 3e-2 if dtype == torch.bfloat16 or packed else 1e-4
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_quantize_model_replaces_linears_not_embeddings() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10))
    q.quantize_model(model, "int8")
    assert isinstance(model[0], nn.Embedding)
    assert all(isinstance(m, q.Int8Linear) for m in model[1:])
    assert q.quantize_model(model, "none") is model
