"""The Triton int8 weight-only GEMM against the torch reference.

Without CUDA it runs in triton's interpreter on CPU tensors (tests/conftest.py sets
``TRITON_INTERPRET=1`` before triton is imported; the fixture fails loudly if that did not
take effect); with CUDA the same tests run the compiled kernel on the GPU. Shapes are tiny
and odd (not multiples of the block sizes) so every mask is exercised and the interpreter
stays fast.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
import triton

from engine import quantization as q

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    from engine import triton_int8

    if not HAS_CUDA and type(triton_int8._int8_matmul_kernel).__name__ != "InterpretedFunction":
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (see conftest)")
    assert triton.language is not None
    return triton_int8


def _operands(m: int, n: int, k: int, dtype: torch.dtype, bias: bool):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    values, scales = q.quantize_per_channel(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return (t.to(DEVICE) if t is not None else None for t in (x, values, scales, b))


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 40, 72), (5, 70, 130), (20, 33, 64), (70, 20, 40)])
def test_int8_gemm_matches_reference(kernels, dtype, tol, m, n, k) -> None:
    x, values, scales, bias = _operands(m, n, k, dtype, bias=m == 5)
    out = kernels.int8_linear(x, values, scales, bias)
    # The reference in fp32 from the same (rounded) inputs: the kernel accumulates in fp32.
    ref = q.reference_int8_linear(x.float(), values, scales, None if bias is None else bias.float())
    assert out.dtype == dtype and out.shape == (m, n)
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_strided_activation_rows(kernels) -> None:
    """A non-contiguous ``x`` (a column slice, as a fused projection's output would be)."""
    x, values, scales, _ = _operands(3, 48, 64, torch.float32, bias=False)
    wide = torch.cat([x, torch.zeros_like(x)], dim=1)[:, :64]
    assert not wide.is_contiguous()
    out = kernels.int8_linear(wide, values, scales)
    torch.testing.assert_close(out, q.reference_int8_linear(x, values, scales, None))


def test_bad_operands_are_clear_errors(kernels) -> None:
    x, values, scales, _ = _operands(2, 16, 32, torch.float32, bias=False)
    with pytest.raises(ValueError, match="shape mismatch"):
        kernels.int8_linear(x[:, :16], values, scales)
    with pytest.raises(ValueError, match="must be int8"):
        kernels.int8_linear(x, values.float(), scales)
    with pytest.raises(ValueError, match="activation dtype"):
        kernels.int8_linear(x.double(), values, scales)


def test_empty_batch(kernels) -> None:
    x, values, scales, _ = _operands(1, 16, 32, torch.float32, bias=False)
    assert kernels.int8_linear(x[:0], values, scales).shape == (0, 16)
