"""Load and check the draft model of ``speculative_method="draft"``.

A draft must share the target's tokenizer: the same vocabulary size and the same token ↔ id
map (its proposals are token ids the target verifies). Both are checked before any draft
weight is read, so a wrong checkpoint fails the engine's start with a clear
:class:`ModelLoadError`. The draft gets its own paged KV cache with as many blocks as the
target's (a draft has fewer layers, so it is that much smaller), its own BlockManager
(no prefix cache: draft state is per request) and its own ModelRunner.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.block_manager import BlockManager
from engine.kv_cache import KVCache, KVLayout, torch_dtype
from engine.model import load_model
from engine.model_config import ModelConfig, load_model_config
from engine.model_loader import ModelLoadError, resolve_model
from engine.model_runner import ModelRunner
from engine.sampler import Sampler
from engine.speculative.draft import DraftProposer


@dataclass(frozen=True, slots=True)
class DraftTarget:
    """What the draft must agree with, taken from the target engine."""

    model: ModelConfig
    tokenizer: Any  # the target's HF tokenizer
    max_model_len: int
    num_blocks: int  # the target's KV blocks; the draft cache gets as many
    block_size: int
    dtype: str  # resolved model dtype name ("float32", "bfloat16", ...)
    device: str
    max_chunk: int  # draft prefill chunk (the target's max_num_batched_tokens)
    quantization: str = "none"  # the target's weight quantization; the draft gets the same


def load_draft(path: str, target: DraftTarget) -> DraftProposer:
    """The draft proposer for checkpoint ``path``; ModelLoadError if it does not fit."""
    try:
        source = resolve_model(path)
    except ModelLoadError as exc:
        raise ModelLoadError(f"draft_model: {exc}") from exc
    cfg = load_model_config(source.path, source.name)
    check_compatible(cfg, source.path, target)
    device = torch.device(target.device)
    model = load_model(
        cfg,
        source.path,
        target.max_model_len,
        torch_dtype(target.dtype),
        device,
        target.quantization,
    )
    layout = KVLayout(
        cfg.num_layers,
        cfg.num_kv_heads,
        cfg.head_dim,
        target.block_size,
        target.num_blocks,
        target.dtype,
    )
    runner = ModelRunner(model, KVCache(layout, device), Sampler(0))
    blocks = BlockManager(target.num_blocks, target.block_size, enable_prefix_caching=False)
    return DraftProposer(runner, blocks, target.max_chunk)


def check_compatible(draft: ModelConfig, path: Path, target: DraftTarget) -> None:
    """Same vocabulary size and tokenizer, and a context at least the target's."""
    where = f"draft_model {str(path)!r}"
    if draft.vocab_size != target.model.vocab_size:
        raise ModelLoadError(
            f"{where} has vocab_size {draft.vocab_size}; the target model has "
            f"{target.model.vocab_size} (a draft must share the target's tokenizer)"
        )
    if draft.context_len < target.max_model_len:
        raise ModelLoadError(
            f"{where} has a context of {draft.context_len} tokens, shorter than the "
            f"target's max_model_len {target.max_model_len}; lower max_model_len"
        )
    tokenizer = _load_tokenizer(path, where)
    if tokenizer.get_vocab() != target.tokenizer.get_vocab():
        raise ModelLoadError(
            f"{where} has a different tokenizer from the target model (its token <-> id "
            "map differs); a draft must share the target's tokenizer"
        )


def _load_tokenizer(path: Path, where: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {where}: {exc}") from exc
