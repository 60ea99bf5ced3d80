"""Weight-only int8 quantization: per-output-channel symmetric scales, computed at load.

``quantize_per_channel`` turns a ``(out, in)`` weight into int8 values and one fp32 scale
per output row (``scale = max|w_row| / 127``, so the row's largest weight maps to ±127 and
nothing clips). :class:`Int8Linear` replaces ``nn.Linear`` and keeps only the int8 weight
and the scales; activations stay in the model's dtype (bf16 / fp16 / fp32).

Which matmul runs (mechanism here, choice in :func:`cpu_kernel`), measured on this host's
CPU at SmolLM2-135M's shapes (``python -m benchmarks.quantization``, its kernel table; numbers in
benchmarks/README.md, "Weight quantization"):

- CUDA: the Triton weight-only GEMM of :mod:`engine.triton_int8` (int8 loaded, converted
  in registers, fp32 accumulate, scales applied to the output).
- CPU, few rows (decode-sized batches, ``<= PACKED_MAX_ROWS``): ``torch._weight_int8pack_mm``
  on bf16 activations; fp32 / fp16 inputs are cast to bf16 around it (its fp32 kernel is
  scalar: 4-10x slower than dense fp32). 2.3-3x faster than the dense bf16 matmul at
  batch 1; its cost grows linearly with the rows: slower than dense bf16 from ~8 rows, and
  than convert+matmul (below) from ~14-17 rows.
- CPU, more rows (prefill chunks, large decode batches): convert the int8 weight to the
  activation dtype tile by tile (``copy_`` into a buffer: the vectorised conversion, ~6x
  faster than ``.to()``), run the dense matmul, then scale the output per channel in fp32.
  Each call pays the conversion of the whole weight, so these matmuls are ~2x slower
  than the unquantized model's (bf16, 32 rows: lm_head 18 vs 9.3 ms, gate/up 0.73 vs 0.33).

Scales are rounded *up* to values bf16 represents exactly, so the bf16 copy the packed
kernel needs is the same scale, not a 0.4%-off per-channel gain (rounding up never clips).

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

from engine.config import QUANTIZATION_METHODS

INT8_MAX = 127
PACKED_MAX_ROWS = 12  # CPU: _weight_int8pack_mm up to here (it beats convert+matmul to ~14)
KERNEL_PACKED = "int8pack_mm"
KERNEL_DEQUANT = "dequant_matmul"
KERNEL_TRITON = "triton"
# Float weight converted per tile by dequant_matmul: under glibc's largest mmap threshold
# (32 MiB), so freed tiles are reused rather than unmapped.
DEQUANT_TILE_BYTES = 8 << 20


def check_method(method: str) -> None:
    """Raise a clear ``ValueError`` for a quantization value we do not implement."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {method!r}")


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 values (out, in), fp32 scales (out,))`` with ``weight ≈ values * scales[:, None]``.

    Symmetric, one scale per output row, rounded up to a bf16-exact value; an all-zero row
    gets scale 1 (its values are 0).
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scales = _round_up_to_bf16(w.abs().amax(dim=1) / INT8_MAX)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = torch.round(w / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return values.contiguous(), scales.contiguous()


def _round_up_to_bf16(scales: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= each (non-negative, finite) fp32 scale, as fp32."""
    rounded = scales.to(torch.bfloat16)
    below = rounded.float() < scales
    bumped = (rounded.view(torch.int16) + 1).view(torch.bfloat16)  # next value up (x >= 0)
    return torch.where(below, bumped, rounded).float()


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float weight ``values * scales[:, None]`` in ``dtype``."""
    return (values.float() * scales[:, None].float()).to(dtype)


def reference_int8_linear(
    x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ dequantize(W).T + bias`` in ``x``'s dtype: the reference every kernel matches."""
    return torch.nn.functional.linear(x, dequantize(values, scales, x.dtype), bias)


def dequant_matmul(
    x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ (values * scales).T + bias`` without materialising the scaled weight.

    The int8 values convert exactly to any float dtype (``copy_`` is the vectorised
    conversion) a tile of output channels at a time, at most :data:`DEQUANT_TILE_BYTES` of
    float weight each: the allocator then reuses the tile's memory from call to call
    instead of mapping (and page-faulting) a fresh whole-matrix buffer, which made
    lm_head's calls ~2.5x slower. The scales multiply the output in fp32."""
    out_features, in_features = values.shape
    tile = max(1, DEQUANT_TILE_BYTES // (in_features * x.element_size()))
    parts = []
    for start in range(0, out_features, tile):
        chunk = values[start : start + tile]
        weight = torch.empty(chunk.shape, dtype=x.dtype, device=x.device).copy_(chunk)
        parts.append(torch.nn.functional.linear(x, weight))
    out = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).float() * scales.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


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
        # bf16 copy for the packed CPU kernel (exact: the scales are bf16 values).
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        values, scales = quantize_per_channel(linear.weight)
        device = linear.weight.device
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(values.to(device), scales.to(device), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if flat.is_cuda:
            from engine import triton_int8  # lazy: CPU installs never import triton

            out = triton_int8.int8_linear(flat, self.weight_int8, self.scales, self.bias)
        elif self.kernel(flat.shape[0]) == KERNEL_PACKED:
            out = self._packed(flat)
        else:
            out = dequant_matmul(flat, self.weight_int8, self.scales, self.bias)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def kernel(self, rows: int) -> str:
        """The kernel a CPU call with ``rows`` activation rows takes."""
        return cpu_kernel(rows, self.out_features, self.in_features)

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        bf16 = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
        out = torch._weight_int8pack_mm(bf16.contiguous(), self.weight_int8, self.scales_bf16)
        if self.bias is not None:
            out = out.float() + self.bias.float()
        return out if out.dtype == x.dtype else out.to(x.dtype)

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
