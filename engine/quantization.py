"""Weight-only int8 quantization: per-output-channel symmetric scales, computed at load.

``quantize_per_channel`` turns a ``(out, in)`` weight into int8 values and one fp32 scale
per output row (``scale = max|w_row| / 127``, so the row's largest weight maps to ±127 and
nothing clips). :class:`Int8Linear` replaces ``nn.Linear`` and keeps only the int8 weight
and the scales; activations stay in the model's dtype (bf16 / fp16 / fp32).

Which matmul runs (mechanism here, choice in :func:`cpu_kernel`), measured on this host's
CPU at SmolLM2-135M's shapes (benchmarks/README.md, "Weight quantization"):

- CUDA: the Triton weight-only GEMM of :mod:`engine.triton_int8` (int8 loaded, dequantised
  in registers, fp32 accumulate).
- CPU, few rows (decode-sized batches, ``<= PACKED_MAX_ROWS``): ``torch._weight_int8pack_mm``
  on bf16 activations (fp32 / fp16 inputs are cast to bf16 around it). 2.3-2.6x faster than
  the dense bf16 matmul at batch 1; slower than dense from ~8 rows on.
- CPU, more rows (prefill chunks, large decode batches): dequantise the weight to the
  activation dtype and run the dense matmul (the reference). Correct, but each call pays
  the int8→float conversion of the whole weight, so large batches are slower than the
  unquantized model.

Not used: torch.ao dynamic quantization (``quantized::linear_dynamic``, fbgemm) is the
fastest at every shape here, but it quantizes activations too (per tensor, per call), which
is not weight-only and makes a request's output depend on the other rows in its batch.

Quantized: every projection of every layer (qkv, o, gate/up, down) and ``lm_head`` (the
single largest matrix, ~21% of the bytes a decode step reads). Not quantized: the token
embedding (a row lookup reads ``batch`` rows, not the whole table; a tied ``lm_head`` gets
its own int8 copy), norms and biases.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

QUANTIZATION_METHODS = ("none", "int8")
INT8_MAX = 127
PACKED_MAX_ROWS = 4  # CPU: rows up to which _weight_int8pack_mm beats dequantise+matmul
KERNEL_PACKED = "int8pack_mm"
KERNEL_DEQUANT = "dequant_matmul"
KERNEL_TRITON = "triton"


def check_method(method: str) -> None:
    """Raise a clear ``ValueError`` for a quantization value we do not implement."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {method!r}")


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 values (out, in), fp32 scales (out,))`` with ``weight ≈ values * scales[:, None]``.

    Symmetric, one scale per output row; an all-zero row gets scale 1 (its values are 0).
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scales = w.abs().amax(dim=1) / INT8_MAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = torch.round(w / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return values.contiguous(), scales.contiguous()


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float weight ``values * scales[:, None]`` in ``dtype``."""
    return (values.float() * scales[:, None].float()).to(dtype)


def reference_int8_linear(
    x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ dequantize(W).T + bias`` in ``x``'s dtype: the reference every kernel matches."""
    return torch.nn.functional.linear(x, dequantize(values, scales, x.dtype), bias)


def cpu_kernel(rows: int, out_features: int, in_features: int) -> str:
    """Policy: which CPU kernel runs a matmul of ``rows`` activation rows.

    ``_weight_int8pack_mm`` crashed here (segfault) on odd shapes such as 130x72, so it is
    used only on aligned ones (every SmolLM2 / Llama projection is)."""
    aligned = out_features % 16 == 0 and in_features % 64 == 0
    return KERNEL_PACKED if aligned and rows <= PACKED_MAX_ROWS else KERNEL_DEQUANT


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight and per-output-channel scales (weight-only)."""

    def __init__(
        self, values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = values.shape
        self.register_buffer("weight_int8", values)
        self.register_buffer("scales", scales.float())
        self.register_buffer("bias", bias)
        self._scales_bf16: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        values, scales = quantize_per_channel(linear.weight)
        device = linear.weight.device
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(values.to(device), scales.to(device), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if flat.is_cuda:
            from engine import triton_int8  # lazy: CPU installs never import triton

            out = triton_int8.int8_linear(flat, self.weight_int8, self.scales, self.bias)
        elif cpu_kernel(flat.shape[0], self.out_features, self.in_features) == KERNEL_PACKED:
            out = self._packed(flat)
        else:
            out = reference_int8_linear(flat, self.weight_int8, self.scales, self.bias)
        return out.reshape(*lead, self.out_features)

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        if self._scales_bf16 is None:
            self._scales_bf16 = self.scales.to(torch.bfloat16)
        out = torch._weight_int8pack_mm(
            x.to(torch.bfloat16).contiguous(), self.weight_int8, self._scales_bf16
        )
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


def quantizable_linears(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for each ``nn.Linear`` of the model (the embedding is an
    ``nn.Embedding`` and is never returned)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                yield parent, name, child


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Replace the model's linear layers in place per ``method``; ``none`` is a no-op."""
    check_method(method)
    if method == "none":
        return model
    for parent, name, linear in list(quantizable_linears(model)):
        setattr(parent, name, Int8Linear.from_linear(linear))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (what the weights occupy)."""
    tensors = [*model.parameters(), *model.buffers()]
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
