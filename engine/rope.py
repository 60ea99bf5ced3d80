"""Rotary position embeddings with the checkpoint's scaling (linear, llama3, yarn, ...).

cos/sin tables are built once for every position up to the context length; a forward pass
indexes them by each token's absolute position, so chunked prefill and decode need no
special case.
"""

from __future__ import annotations

from typing import Any

import torch


def inverse_frequencies(hf_config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) for the config's rope type."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (base**exponents), 1.0
    if rope_type == "dynamic":
        # Dynamic NTK rescales with the live sequence length; a paged cache stores rotated
        # keys, so the tables would have to change under them. Refuse rather than drift.
        raise ValueError("dynamic NTK RoPE scaling is not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported RoPE type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding:
    """Precomputed cos/sin tables; :meth:`apply` rotates q and k in place of HF's kernel."""

    def __init__(
        self,
        hf_config: Any,
        head_dim: int,
        max_positions: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        inv_freq, scaling = inverse_frequencies(hf_config, head_dim)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        table = torch.cat((freqs, freqs), dim=-1)
        self.cos = (table.cos() * scaling).to(dtype=dtype, device=device)
        self.sin = (table.sin() * scaling).to(dtype=dtype, device=device)

    def apply(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q (T, H, D)`` and ``k (T, KVH, D)`` for tokens at ``positions (T,)``."""
        cos = self.cos.index_select(0, positions).unsqueeze(1)
        sin = self.sin.index_select(0, positions).unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
