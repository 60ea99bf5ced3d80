"""Our forward pass for the Llama family (Llama, Mistral, Qwen2), reading HF weights.

RMSNorm → attention (fused QKV projection, optional bias, RoPE, GQA over the paged cache)
→ residual → RMSNorm → SwiGLU MLP (fused gate/up) → residual, for every layer. Tokens of a
step arrive flattened as ``(num_tokens,)``; there is no batch or padding axis. Logits are
computed only for the rows that sample.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from engine.attention import AttentionMetadata, paged_attention
from engine.kv_cache import KVCache
from engine.model_config import ModelConfig
from engine.model_loader import ModelLoadError
from engine.quantization import quantize_model
from engine.rope import RotaryEmbedding

LayerHook = Callable[[int], None]  # called after each layer (layer-wise KV transfer)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding,
        positions: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        q, k = rope.apply(positions, q, k)
        out = paged_attention(q, k, v, kv[0], kv[1], meta, self.scale)
        return self.o_proj(out.reshape(tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding,
        positions: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, positions, kv, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """The whole network; :meth:`forward` returns final hidden states, not logits."""

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.cfg = cfg
        self.rope = rope
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        after_layer: LayerHook | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for index, layer in enumerate(self.layers):
            x = layer(x, self.rope, positions, kv_cache.layer(index), meta)
            if after_layer is not None:
                after_layer(index)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def load_model(
    cfg: ModelConfig,
    path: Path,
    max_positions: int,
    dtype: torch.dtype,
    device: torch.device,
    quantization: str = "none",
) -> DecoderModel:
    """Build the model on the meta device (no random init), then adopt the checkpoint's
    tensors. Tied embeddings stay one tensor. ``quantization`` (engine/quantization.py)
    then swaps the linear layers, fused qkv / gate-up included, for quantized ones."""
    rope = RotaryEmbedding(cfg.hf_config, cfg.head_dim, max_positions, dtype, device)
    with torch.device("meta"):
        model = DecoderModel(cfg, rope)
    result = model.load_state_dict(_read_weights(path, cfg), strict=False, assign=True)
    if result.missing_keys:
        raise ModelLoadError(f"checkpoint {str(path)!r} lacks weights: {result.missing_keys[:5]}")
    tied = model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    model = model.to(device=device, dtype=dtype).eval()
    if tied:  # .to() converts the two parameters separately: keep one copy
        model.lm_head.weight = model.embed_tokens.weight
    return quantize_model(model, quantization)


def _read_weights(path: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"no *.safetensors weights in {str(path)!r}")
    raw: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                raw[name.removeprefix("model.")] = handle.get_tensor(name)
    if "lm_head.weight" not in raw or cfg.tie_word_embeddings:
        raw["lm_head.weight"] = raw["embed_tokens.weight"]
    return _fuse_projections(raw, cfg.num_layers)


def _fuse_projections(raw: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """HF keeps q/k/v and gate/up separate; one matmul each is faster on every device."""
    for i in range(num_layers):
        attn, mlp = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        for kind in ("weight", "bias"):
            parts = [raw.pop(f"{attn}.{p}_proj.{kind}", None) for p in ("q", "k", "v")]
            if all(part is not None for part in parts):
                raw[f"{attn}.qkv_proj.{kind}"] = torch.cat(parts)
            parts = [raw.pop(f"{mlp}.{p}_proj.{kind}", None) for p in ("gate", "up")]
            if all(part is not None for part in parts):
                raw[f"{mlp}.gate_up_proj.{kind}"] = torch.cat(parts)
    return raw
