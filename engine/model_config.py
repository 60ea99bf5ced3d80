"""The model's shape, read from a HF checkpoint's config.json (via transformers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.model_loader import SUPPORTED_ARCHITECTURES, ModelLoadError


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    model_type: str  # llama | qwen2 | mistral
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always; Llama when attention_bias is set
    mlp_bias: bool
    sliding_window: int | None  # Mistral; contexts are capped at it (no windowed attention)
    eos_token_ids: frozenset[int]
    hf_config: Any  # the transformers config object, for RoPE scaling parameters

    @property
    def context_len(self) -> int:
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings


def load_model_config(path: Path, name: str) -> ModelConfig:
    from transformers import AutoConfig, GenerationConfig

    hf = AutoConfig.from_pretrained(path)
    if hf.model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"unsupported architecture {hf.model_type!r}")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ModelLoadError(f"unsupported activation {hf.hidden_act!r} (SwiGLU/silu only)")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return ModelConfig(
        name=name,
        model_type=hf.model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=hf.rms_norm_eps,
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=hf.model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        sliding_window=_sliding_window(hf),
        eos_token_ids=_eos_ids(hf, path, GenerationConfig),
        hf_config=hf,
    )


def _sliding_window(hf: Any) -> int | None:
    if hf.model_type == "qwen2" and not getattr(hf, "use_sliding_window", False):
        return None
    window = getattr(hf, "sliding_window", None)
    return int(window) if window else None


def _eos_ids(hf: Any, path: Path, generation_config_cls: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (hf.eos_token_id, _generation_eos(path, generation_config_cls)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return frozenset(ids)


def _generation_eos(path: Path, generation_config_cls: Any) -> int | list[int] | None:
    if not (path / "generation_config.json").is_file():
        return None
    return generation_config_cls.from_pretrained(path).eos_token_id
